package server

import (
	"runtime"
	"strings"
)

// auditGoroutines counts the goroutines running an audit or its dump
// (the server's audit, pinhole's listSets).
func auditGoroutines() int {
	buf := make([]byte, 1<<22)
	n := 0
	for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
		if strings.Contains(g, "server.(*Server).audit(") || strings.Contains(g, "pinhole.listSets(") {
			n++
		}
	}
	return n
}
