package fuzz

import (
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// seeds are the seed inputs committed under testdata/fuzz: the golden
// packets of pcp's tests (every message type and error class) and the
// bytes captured from natpmpc and go-nat-pmp. Regenerate the files with
//
//	PCPD_WRITE_CORPUS=1 go test ./fuzz -run TestWriteSeedCorpus
var seeds = map[string]string{
	// PCP requests.
	"map-ipv6":   "02010000" + "00000e10" + "20010db8000100000000000000000010" + "0102030405060708090a0b0c" + "06000000" + "01bb0050" + "00000000000000000000000000000000",
	"map-ipv4":   "02010000" + "00000e10" + "00000000000000000000ffff0a000005" + "0102030405060708090a0b0c" + "11000000" + "13881388" + "00000000000000000000ffff00000000",
	"map-delete": "02010000" + "00000000" + "20010db8000100000000000000000010" + "0102030405060708090a0b0c" + "06000000" + "01bb04d2" + "00000000000000000000000000000000",
	"peer":       "02020000" + "00000e10" + "20010db8000100000000000000000010" + "0102030405060708090a0b0c" + "11000000" + "13880000" + "00000000000000000000000000000000" + "00350000" + "20010db8009900000000000000000001",
	"announce":   "02000000" + "00000063" + "00000000000000000000ffff0a000005",
	"map-pf-filter-desc": "02010000" + "00000e10" + "20010db8000100000000000000000010" + "0102030405060708090a0b0c" + "06000000" + "01bb0050" + "00000000000000000000000000000000" +
		"02000000" + "0300001400300000" + "20010db8009900000000000000000000" + "80000003776562ff",
	"map-tp":            "02010000" + "00000e10" + "20010db8000100000000000000000010" + "0102030405060708090a0b0c" + "06000000" + "01bb0050" + "00000000000000000000000000000000" + "01000010" + "20010db8000100020000000000000001",
	"map-portset":       "02010000" + "00000e10" + "00000000000000000000ffff0a000005" + "0102030405060708090a0b0c" + "11000000" + "13881388" + "00000000000000000000ffff00000000" + "8200000500101388" + "01000000",
	"map-filters-clear": "02010000" + "00000e10" + "20010db8000100000000000000000010" + "0102030405060708090a0b0c" + "06000000" + "01bb0050" + "00000000000000000000000000000000" + "0300001400300000" + "20010db8009900000000000000000000" + "0300001400001234" + "20010db8000000000000000000000001" + "03000014008001bb" + "20010db8009800000000000000000001",
	"map-filter-v4":     "02010000" + "00000e10" + "00000000000000000000ffff0a000005" + "0102030405060708090a0b0c" + "11000000" + "13881388" + "00000000000000000000ffff00000000" + "0300001400780050" + "00000000000000000000ffffc0000200",
	"map-unknown-opts":  "02010000" + "00000e10" + "20010db8000100000000000000000010" + "0102030405060708090a0b0c" + "06000000" + "01bb0050" + "00000000000000000000000000000000" + "c8000003aabbcc00" + "0400000400000000",
	"map-bad-option":    "02010000" + "00000e10" + "20010db8000100000000000000000010" + "0102030405060708090a0b0c" + "06000000" + "01bb0050" + "00000000000000000000000000000000" + "03000040" + "0030000020010db8009900000000000000000000",
	"opcode-5":          "02050000" + "00000e10" + "20010db8000100000000000000000010" + "aabbccdd",
	"version-3-short":   "03010000" + "00000e10" + "20010db80001000000000000000000",
	"version-1-tiny":    "0100",
	"r-bit":             "0281" + "0000000000000000000000000000000000000000000000",
	"map-61":            "02010000" + "00000e10" + "20010db8000100000000000000000010" + "0102030405060708090a0b0c" + "06000000" + "01bb0050" + "00000000000000000000000000000000" + "ee",
	// PCP responses.
	"resp-map":      "02810000" + "00000e10" + "0000abcd" + "000000000000000000000000" + "0102030405060708090a0b0c" + "06000000" + "01bb0050" + "20010db8000100000000000000000010",
	"resp-peer":     "02820000" + "00000e10" + "0000abcd" + "000000000000000000000000" + "0102030405060708090a0b0c" + "11000000" + "13881388" + "20010db8000100000000000000000010" + "00350000" + "20010db8009900000000000000000001",
	"resp-announce": "02800000" + "00000000" + "0000abcd" + "000000000000000000000000",
	"resp-map-opts": "02810000" + "00000e10" + "0000abcd" + "000000000000000000000000" + "0102030405060708090a0b0c" + "06000000" + "01bb0050" + "00000000000000000000000000000000" +
		"02000000" + "0300001400300000" + "20010db8009900000000000000000000" + "8000000377656200" + "01000010" + "20010db8000100020000000000000001",
	"resp-error-copy": "02810003" + "00000708" + "0000abcd" + "000100000000000000000010" + "0102030405060708090a0b0c" + "06000000" + "01bb0050" + "00000000000000000000000000000000" + "ee000000",
	// NAT-PMP, including the captured third-party requests.
	"pmp-natpmpc-address": "0000",
	"pmp-natpmpc-tcp":     "0002000004d204d200000e10",
	"pmp-natpmpc-udp-del": "000100001389138800000000",
	"pmp-gonatpmp-tcp":    "000200001f90005000001c20",
	"pmp-gonatpmp-udp":    "00010000ca6c000000000000",
	"pmp-opcode-7":        "00070000aabb",
	"pmp-opcode-9":        "0009",
	"pmp-short-map":       "0001000013881388",
	"pmp-reply-address":   "008000000000abcdcb007101",
	"pmp-reply-map":       "008200000000abcd1f90005000001c20",
}

// targetArgs renders the extra arguments each target takes after the
// packet, in the corpus file syntax.
var targetArgs = map[string][]string{
	"FuzzRequestRoundTrip":  {""},
	"FuzzParseRequest":      {"byte('\\x00')\nbyte('\\x01')", "byte('\\x01')\nbyte('\\x02')", "byte('\\x0e')\nbyte('\\x03')", "byte('\\b')\nbyte('\\x00')"},
	"FuzzErrorResponse":     {"byte('\\x03')", "byte('\\x01')", "byte('\\f')"},
	"FuzzResponseRoundTrip": {""},
	"FuzzPMPRoundTrip":      {"uint16(0)\nuint32(43981)", "uint16(3)\nuint32(0)"},
	// The engine's target (server_fuzz_test.go) also gets the codec's
	// packets as committed seeds, from an IPv6 and an IPv4 source.
	"FuzzServerHandle": {"bool(false)", "bool(true)"},
}

func TestWriteSeedCorpus(t *testing.T) {
	if os.Getenv("PCPD_WRITE_CORPUS") == "" {
		t.Skip("set PCPD_WRITE_CORPUS=1 to regenerate testdata/fuzz")
	}
	for target, argsets := range targetArgs {
		dir := filepath.Join("testdata", "fuzz", target)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for name, h := range seeds {
			b, err := hex.DecodeString(h)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			for i, args := range argsets {
				var sb strings.Builder
				fmt.Fprintf(&sb, "go test fuzz v1\n[]byte(%q)\n", b)
				if args != "" {
					sb.WriteString(args + "\n")
				}
				file := filepath.Join(dir, fmt.Sprintf("seed-%s-%d", name, i))
				if err := os.WriteFile(file, []byte(sb.String()), 0o644); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
}
