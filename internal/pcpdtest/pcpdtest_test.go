package pcpdtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/pcpd/pcpd/internal/netlab"
)

func TestMain(m *testing.M) { os.Exit(Main(m)) }

func TestLog(t *testing.T) {
	var l Log
	fmt.Fprint(&l, "one\ntwo\n")
	off := l.Len()
	fmt.Fprint(&l, "three\nfour\n")
	tests := []struct {
		name, got, want string
	}{
		{"String", l.String(), "one\ntwo\nthree\nfour\n"},
		{"Since", l.Since(off), "three\nfour\n"},
		{"Since past the end", l.Since(1000), ""},
		{"Tail within", l.Tail(2), "three\nfour"},
		{"Tail beyond", l.Tail(10), "one\ntwo\nthree\nfour"},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s = %q, want %q", tt.name, tt.got, tt.want)
		}
	}
}

// Start reports a daemon that dies before serving at once, with its exit
// status and output, rather than waiting out the timeout; one that never
// becomes ready is killed and reported at the timeout.
func TestStartFailures(t *testing.T) {
	netlab.RequireRoot(t)
	ns := netlab.NewNS(t, "pcpdtest")
	notReady := func(context.Context) error { return errors.New("not yet") }
	tests := []struct {
		name string
		args []string
		want []string // in the error
		// Start's Timeout; a row that wants pcpd's exit gives it 30 s: that
		// Start returned on the exit rather than the timeout shows in the
		// error ("exited before serving", not "not ready after"), not in
		// how long it took, which a loaded box stretches.
		timeout time.Duration
		atLeast time.Duration // the never-ready row: Start waited its Timeout
	}{
		// A bad flag: pcpd exits 2 before touching anything.
		{name: "exits", args: []string{"serve", "--max-lifetime", "forever"},
			want: []string{"exited before serving", "exit status 2", `"forever" is not a duration`}, timeout: 30 * time.Second},
		// pcpd --help prints and exits 0: still not serving.
		{name: "exits cleanly", args: []string{"--help"},
			want: []string{"exited before serving (<nil>)"}, timeout: 30 * time.Second},
		// A daemon that runs but never answers: the timeout.
		{name: "never ready", args: []string{"serve", "--interface", "lo", "--client", "a=2001:db8::/48",
			"--state-dir", t.TempDir(), "--socket", t.TempDir() + "/pcpd.sock"},
			want:    []string{"not ready after 2s", "not yet"},
			timeout: 2 * time.Second, atLeast: 2 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := New(t, Config{NS: ns, Args: tt.args, Ready: notReady, Timeout: tt.timeout})
			t0 := time.Now()
			err := d.Start()
			took := time.Since(t0)
			if err == nil {
				t.Fatal("Start succeeded")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
			if took < tt.atLeast {
				t.Errorf("Start took %v, want at least %v", took, tt.atLeast)
			}
			// The never-ready daemon is still running: Kill ends it.
			d.Kill()
			if d.Running() || d.PID() != 0 {
				t.Errorf("after Kill: running %v, pid %d", d.Running(), d.PID())
			}
		})
	}
}
