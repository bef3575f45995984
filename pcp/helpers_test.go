package pcp

import (
	"encoding/hex"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp/cmpopts"
)

// testEpoch is the Epoch every golden reply carries.
const testEpoch Epoch = 0xabcd

// unhex decodes commented hex: on each line everything from "//" on is a
// comment, whitespace is ignored, and "00*16" repeats an octet.
func unhex(t testing.TB, s string) []byte {
	t.Helper()
	var sb strings.Builder
	for line := range strings.SplitSeq(s, "\n") {
		if i := strings.Index(line, "//"); i >= 0 {
			line = line[:i]
		}
		for f := range strings.FieldsSeq(line) {
			if octet, n, ok := strings.Cut(f, "*"); ok {
				var count int
				for _, c := range n {
					count = count*10 + int(c-'0')
				}
				sb.WriteString(strings.Repeat(octet, count))
				continue
			}
			sb.WriteString(f)
		}
	}
	b, err := hex.DecodeString(sb.String())
	if err != nil {
		t.Fatalf("bad hex in test: %v", err)
	}
	return b
}

func addr(s string) netip.Addr {
	if s == "" {
		return netip.Addr{}
	}
	return netip.MustParseAddr(s)
}

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

var testNonce = Nonce{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}

// filters builds Options.Filters the way the decoder does.
func withFilters(o Options, fs ...Filter) Options {
	o.Filters = fs
	return o
}

// cmpOpts lets go-cmp compare netip values (unexported fields).
var cmpOpts = cmpopts.EquateComparable(netip.Addr{}, netip.Prefix{})

func netipAddrPort(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }
