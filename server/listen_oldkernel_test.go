package server

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/sys/unix"

	"github.com/pcpd/pcpd/internal/netlab"
)

// TestListenerOldKernelBindFails (h/lodrop; h/upd's left (4)): the serving
// sockets are bound to their interface by index (SO_BINDTOIFINDEX), which
// a kernel before 5.1 does not have (ENOPROTOOPT), and which before 5.7
// needs CAP_NET_RAW (EPERM; the shipped unit gives pcpd CAP_NET_ADMIN
// only). Either way every bind failed, every pass logged "cannot serve
// address" with the bare errno, and pcpd ran serving nothing. Now the
// listener asks the kernel once, before its first pass, and stops with an
// error naming the option, what it needs, and the minimum kernel; Serve
// returns it, pcpd serve exits 1 with it. The kernel's answer is the
// seam's (bindIndex): this box's kernel has the option. A kernel that
// takes it serves as before. No root: the test process's own namespace,
// interface lo, an ephemeral port.
func TestListenerOldKernelBindFails(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error    // the kernel's answer to SO_BINDTOIFINDEX
		want []string // in run's error; nil: it serves
	}{
		{"before Linux 5.1", unix.ENOPROTOOPT, []string{"SO_BINDTOIFINDEX", "Linux 5.1", "Linux 5.6", "README.md"}},
		{"before Linux 5.7 without CAP_NET_RAW", unix.EPERM, []string{"SO_BINDTOIFINDEX", "CAP_NET_RAW", "Linux 5.7", "on kernel " + kernelRelease(), "seccomp"}},
		{"a kernel that has it", nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			core, logs := observer.New(zapcore.DebugLevel)
			l := &listener{log: zap.New(core), ifaces: []string{"lo"}, port: 0, out: make(chan packet, 64), pass: time.Hour,
				bindIndex: func(fd, index int) error {
					if tc.err != nil {
						return tc.err
					}
					return nil // bound to nothing: the test process's sockets
				}}
			ctx, cancel := context.WithTimeout(context.Background(), followNever)
			defer cancel()
			errc := make(chan error, 1)
			go func() { errc <- l.run(ctx) }()
			if tc.want == nil {
				if err := netlab.Eventually(followNever, func() error {
					if len(l.addrs()) == 0 {
						return errors.New("nothing served on lo")
					}
					return nil
				}); err != nil {
					t.Fatalf("%v (logged: %v)", err, logged(logs))
				}
				cancel()
				if err := <-errc; err != nil {
					t.Errorf("run: %v", err)
				}
				return
			}
			err := <-errc
			if err == nil {
				t.Fatalf("with SO_BINDTOIFINDEX answered %v, run = <nil> once its context ended, serving %v; want an error naming the kernel (logged: %v)",
					tc.err, l.addrs(), logged(logs))
			}
			if !errors.Is(err, tc.err) {
				t.Errorf("run = %v, want it to wrap %v", err, tc.err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("run = %q, which does not name %q", err, w)
				}
			}
			if n := len(l.addrs()); n != 0 {
				t.Errorf("run returned %v with %d sockets open", err, n)
			}
		})
	}
}

// logged is the first two messages of logs, each with its error, if
// any, and how many there are.
func logged(logs *observer.ObservedLogs) []string {
	var out []string
	for _, e := range logs.All() {
		m := e.Message
		if err, ok := e.ContextMap()["error"]; ok {
			m += fmt.Sprintf(": %v", err)
		}
		out = append(out, m)
		if len(out) == 2 {
			out = append(out, fmt.Sprintf("… %d in all", len(logs.All())))
			break
		}
	}
	return out
}
