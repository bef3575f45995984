package pinhole

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// ErrNotOurs: the configured table (standalone) or entry chain (attached)
// already exists and holds objects pcpd did not create; Setup and Teardown
// refuse to touch it.
var ErrNotOurs = errors.New("object not created by pcpd")

// How pcpd recognises its own objects. google/nftables v0.3.0 can neither
// set nor read a table's userdata, and the table owner flag would tie the
// table's life to pcpd's netlink socket (pinholes must outlive pcpd). So
// the mark is structural (names and references):
//
//   - standalone: an existing table is pcpd's when it holds at least one of
//     pcpd's sets and nothing but objects bearing pcpd's names (Setup
//     creates the table and every set in one transaction). An admin's table
//     ("filter" with its input/forward/output chains) fails that, so pcpd
//     neither flushes its chains nor sets its forward policy, and Teardown
//     does not delete it.
//   - attached: the entry chain must be a regular chain, and every rule in
//     it must be one pcpd writes: it refers (by set lookup or jump/goto)
//     only to pcpd's own, prefixed objects, and to at least one. A base
//     chain (the admin's forward chain named by mistake) or a chain with
//     the admin's rules is refused: Setup would flush it.
//
// Once Setup succeeded, the Backend knows the objects are its own and
// skips the check, so the repair after tampering (an extra rule in pcpd's
// chain) still rewrites them.

// checkOwnershipLocked returns nil when Setup or Teardown may touch the
// configured objects: they are absent, or pcpd's.
func (b *Backend) checkOwnershipLocked() error {
	if b.owned {
		return nil
	}
	ok, err := b.tableExists()
	if err != nil || !ok {
		return err // attached: Setup reports ErrNoTable itself
	}
	chains, err := b.readConn().ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return fmt.Errorf("pinhole: list chains: %w", classify(err))
	}
	if b.cfg.Attached {
		return b.checkEntryChain(chains)
	}
	sets, err := b.readConn().GetSets(b.table)
	if err != nil {
		return fmt.Errorf("pinhole: list sets: %w", classify(err))
	}
	ours := make(map[string]bool)
	for _, s := range b.allSets() {
		ours[s.Name] = true
	}
	ourSet := false
	for _, s := range sets {
		if !ours[s.Name] {
			return b.notOurs(fmt.Sprintf("it holds set %q", s.Name))
		}
		ourSet = true
	}
	if !ourSet {
		return b.notOurs("it holds none of pcpd's sets")
	}
	names := b.chains()
	for _, c := range chains {
		if c.Table.Name == b.cfg.Table && names[c.Name] == nil && !b.isControlChain(c.Name) && !b.isOwnerChain(c.Name) {
			return b.notOurs(fmt.Sprintf("it holds chain %q", c.Name))
		}
	}
	return nil
}

func (b *Backend) notOurs(why string) error {
	return fmt.Errorf("pinhole: inet table %q exists and pcpd did not create it (%s); choose another table name, or attach to it: %w",
		b.cfg.Table, why, ErrNotOurs)
}

// checkEntryChain checks the attached entry chain, if it exists.
func (b *Backend) checkEntryChain(chains []*nftables.Chain) error {
	i := slices.IndexFunc(chains, func(c *nftables.Chain) bool {
		return c.Table.Name == b.cfg.Table && c.Name == b.chainEntry
	})
	if i < 0 {
		return nil
	}
	c := chains[i]
	if c.Hooknum != nil {
		return fmt.Errorf("pinhole: chain %q of inet %s is a base chain; pcpd needs a regular chain of its own that the admin's chain jumps to: %w",
			c.Name, b.cfg.Table, ErrNotOurs)
	}
	rules, err := b.readConn().GetRules(b.table, c)
	if err != nil {
		return fmt.Errorf("pinhole: rules of %s: %w", c.Name, classify(err))
	}
	for _, r := range rules {
		if !b.ruleIsOurs(r) {
			return fmt.Errorf("pinhole: chain %q of inet %s holds rules pcpd did not write; pcpd needs a chain of its own: %w",
				c.Name, b.cfg.Table, ErrNotOurs)
		}
	}
	return nil
}

// ruleIsOurs: the rule refers to pcpd's prefixed objects, and only to them.
func (b *Backend) ruleIsOurs(r *nftables.Rule) bool {
	prefix := b.cfg.Chain + "_"
	refs := 0
	for _, e := range r.Exprs {
		var name string
		switch e := e.(type) {
		case *expr.Lookup:
			name = e.SetName
		case *expr.Verdict:
			if e.Kind != expr.VerdictJump && e.Kind != expr.VerdictGoto {
				continue
			}
			name = e.Chain
		case *expr.Dynset, *expr.Objref, *expr.Log, *expr.Queue, *expr.NAT, *expr.Redir, *expr.Masq:
			return false // pcpd's entry rules never do these
		default:
			continue
		}
		if !strings.HasPrefix(name, prefix) {
			return false
		}
		refs++
	}
	return refs > 0
}
