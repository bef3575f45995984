package main

import (
	"bytes"
	"strings"
	"testing"
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
