package main

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// op is one kind of request the generator sends.
type op int

const (
	opNew       op = iota // MAP for a slot with no lease: creates a pinhole
	opRenew               // MAP for a live slot, same nonce: refreshes it
	opDelete              // MAP lifetime 0 for a live slot
	opMalformed           // a request the codec rejects (MALFORMED_REQUEST, UNSUPP_*)
	opUnauth              // a well-formed MAP from a source the server must refuse
	numOps
)

var opNames = [numOps]string{"new", "renew", "delete", "malformed", "unauth"}

func (o op) String() string { return opNames[o] }

var errBadMix = errors.New("bad --mix")

// mix holds the relative weight of each op. Weights need not add up to
// 100: "new=1,renew=3" sends renewals three times as often as new MAPs.
type mix [numOps]int

// parseMix reads "new=20,renew=60,delete=10,malformed=5,unauth=5".
// Unnamed ops get weight 0; at least one weight must be positive.
func parseMix(s string) (mix, error) {
	var m mix
	var seen [numOps]bool
	for _, part := range strings.Split(s, ",") {
		part = strings.TrimSpace(part)
		if part == "" {
			continue
		}
		name, val, ok := strings.Cut(part, "=")
		if !ok {
			return mix{}, fmt.Errorf("pcpload: %q is not name=weight: %w", part, errBadMix)
		}
		o := op(-1)
		for i, n := range opNames {
			if n == strings.TrimSpace(name) {
				o = op(i)
			}
		}
		if o < 0 {
			return mix{}, fmt.Errorf("pcpload: unknown op %q (want %s): %w", name, strings.Join(opNames[:], ", "), errBadMix)
		}
		if seen[o] {
			return mix{}, fmt.Errorf("pcpload: op %q given twice: %w", name, errBadMix)
		}
		seen[o] = true
		w, err := strconv.Atoi(strings.TrimSpace(val))
		if err != nil || w < 0 || w > 1_000_000 {
			return mix{}, fmt.Errorf("pcpload: weight %q of %s is not an integer in [0, 1000000]: %w", val, name, errBadMix)
		}
		m[o] = w
	}
	if m.total() == 0 {
		return mix{}, fmt.Errorf("pcpload: mix %q has no positive weight: %w", s, errBadMix)
	}
	return m, nil
}

func (m mix) total() int {
	t := 0
	for _, w := range m {
		t += w
	}
	return t
}

// pick maps r, uniform in [0, total), to an op in proportion to the weights.
func (m mix) pick(r int) op {
	for o, w := range m {
		if r < w {
			return op(o)
		}
		r -= w
	}
	return numOps - 1 // unreachable for r < total
}

func (m mix) String() string {
	var parts []string
	for o, w := range m {
		if w > 0 {
			parts = append(parts, fmt.Sprintf("%s=%d", opNames[o], w))
		}
	}
	return strings.Join(parts, ",")
}
