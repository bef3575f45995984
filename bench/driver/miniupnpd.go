package main

import (
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/pcpd/pcpd/internal/miniupnpd"
)

// mini is miniupnpd (Debian's, PCP enabled) started through
// internal/miniupnpd, the conformance suite's helper, on the same host
// namespace and interface as pcpd.
//
// The helper runs miniupnpd in the foreground with -d, which logs every
// request at debug level; the log is discarded here (not written to a
// file) to keep that cost as small as the helper allows.
type mini struct {
	d  *miniupnpd.Daemon
	ns string
}

func (b *bench) startMiniupnpd(fresh bool) (server, error) {
	d, err := miniupnpd.Start(b.topo.Host, miniupnpd.Options{
		ExtIf: b.topo.HostWANIf, LANIf: b.topo.HostLANIf,
	})
	if err != nil {
		return nil, err
	}
	m := &mini{d: d, ns: b.topo.Host.Name}
	b.cur = m
	return m, nil
}

func (m *mini) stop(syscall.Signal) { m.d.Close() }

// pid finds miniupnpd among the host namespace's processes (the helper
// does not expose it; only perf and the RSS reading need it).
func (m *mini) pid() int {
	out, err := runOut("ip", "netns", "pids", m.ns)
	if err != nil {
		return 0
	}
	for _, f := range strings.Fields(out) {
		comm, err := os.ReadFile("/proc/" + f + "/comm")
		if err == nil && strings.TrimSpace(string(comm)) == "miniupnpd" {
			n, _ := strconv.Atoi(f)
			return n
		}
	}
	return 0
}
