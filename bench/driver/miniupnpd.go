package main

import "errors"

// startMiniupnpd starts miniupnpd (PCP enabled) on the host side through
// internal/miniupnpd, the conformance suite's helper.
func (b *bench) startMiniupnpd(fresh bool) (*proc, error) {
	return nil, errors.New("internal/miniupnpd has not landed yet")
}
