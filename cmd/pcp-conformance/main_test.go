package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/conformance"
)

func TestUsage(t *testing.T) {
	for _, tt := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"no server", nil, 2, "no server"},
		{"bad address", []string{"-server", "not-an-address"}, 2, "bad target configuration"},
		{"bad regexp", []string{"-server", "::1", "-run", "("}, 2, "-run"},
		{"list", []string{"-list"}, 0, "PKT-04"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("PCP_SERVER", "")
			var out, errb bytes.Buffer
			code := run(tt.args, &out, &errb)
			if code != tt.code || !strings.Contains(out.String()+errb.String(), tt.want) {
				t.Errorf("run(%q) = %d, stdout %q, stderr %q; want %d and %q", tt.args, code, out.String(), errb.String(), tt.code, tt.want)
			}
		})
	}
}

func TestCompare(t *testing.T) {
	dir := t.TempDir()
	write := func(name, target, status string) string {
		r := &conformance.Report{Target: target, Results: []conformance.Record{{ID: "PKT-01", Section: "RFC 6887 §8.2", Level: conformance.Must, Name: "short", Status: status, Detail: "d|x"}}}
		path := filepath.Join(dir, name)
		f, err := os.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		r.WriteJSON(f)
		f.Close()
		return path
	}
	a, b := write("a.json", "pcpd", "pass"), write("b.json", "other", "FAIL")
	var out, errb bytes.Buffer
	if code := run([]string{"-compare", a + "," + b}, &out, &errb); code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	for _, want := range []string{"| PKT-01 | RFC 6887 §8.2 | MUST | short | pass | **FAIL** |", `d\|x`, "### other"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
}
