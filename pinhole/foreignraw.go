package pinhole

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// The nftables library (google/nftables v0.3.0) reads ct's direction, a
// u8 in the kernel's answer, as a u32, so a chain holding one rule with
// "ct original proto-dst 8080" (or "ct original ip daddr", any ct key
// with a direction) fails its whole dump (foreignWalk.chain). Such a
// chain's rules are read here instead, from the kernel's own NEWRULE
// messages: every expression by the library's own Unmarshal except ct,
// decoded here (h/left9, issue 9).

// decodeRuleMsgs is the rules of msgs (dumpRuleMsgs, a table of family
// fam) with their handles and expressions as the library would list them
// (an expression of a type it has none for left out, as it does; an
// immediate to the verdict register a Verdict), ct's direction read as
// the u8 it is. Any attribute that does not decode fails the lot.
func decodeRuleMsgs(fam nftables.TableFamily, msgs []netlink.Message) ([]*nftables.Rule, error) {
	var out []*nftables.Rule
	for _, m := range msgs {
		if len(m.Data) < 4 {
			return nil, errors.New("short rule message")
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			return nil, err
		}
		ad.ByteOrder = binary.BigEndian
		r := &nftables.Rule{}
		for ad.Next() {
			switch ad.Type() {
			case unix.NFTA_RULE_HANDLE:
				r.Handle = ad.Uint64()
			case unix.NFTA_RULE_EXPRESSIONS:
				ad.Nested(func(nad *netlink.AttributeDecoder) error {
					for nad.Next() {
						if nad.Type() != unix.NFTA_LIST_ELEM {
							continue
						}
						e, err := decodeExpr(byte(fam), nad.Bytes())
						if err != nil {
							return err
						}
						if e != nil {
							r.Exprs = append(r.Exprs, e)
						}
					}
					return nil
				})
			}
		}
		if err := ad.Err(); err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, nil
}

// decodeExpr is one NFTA_LIST_ELEM's expression (nil: a type the library
// has none for).
func decodeExpr(fam byte, b []byte) (expr.Any, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return nil, err
	}
	var name string
	var data []byte
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_EXPR_NAME:
			name = ad.String()
		case unix.NFTA_EXPR_DATA:
			data = ad.Bytes()
		}
	}
	if err := ad.Err(); err != nil {
		return nil, err
	}
	if name == "ct" {
		return decodeCt(data)
	}
	e := exprNamed(name)
	if e == nil {
		return nil, nil
	}
	if err := expr.Unmarshal(fam, data, e); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if imm, ok := e.(*expr.Immediate); ok && imm.Register == unix.NFT_REG_VERDICT && len(imm.Data) == 0 {
		v := &expr.Verdict{}
		if err := expr.Unmarshal(fam, data, v); err != nil {
			return nil, fmt.Errorf("verdict: %w", err)
		}
		return v, nil
	}
	return e, nil
}

// decodeCt is a ct expression's data: key, its destination or source
// register, and its direction, a u8 (the kernel's nla_policy: NLA_U8).
func decodeCt(b []byte) (*expr.Ct, error) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return nil, err
	}
	ad.ByteOrder = binary.BigEndian
	e := &expr.Ct{}
	for ad.Next() {
		switch ad.Type() {
		case unix.NFTA_CT_KEY:
			e.Key = expr.CtKey(ad.Uint32())
		case unix.NFTA_CT_DREG:
			e.Register = ad.Uint32()
		case unix.NFTA_CT_SREG:
			e.Register, e.SourceRegister = ad.Uint32(), true
		case unix.NFTA_CT_DIRECTION:
			e.Direction = uint32(ad.Uint8())
		}
	}
	return e, ad.Err()
}

// exprNamed is a new expression of the library's type for name (its own
// list, v0.3.0), nil if it has none.
func exprNamed(name string) expr.Any {
	switch name {
	case "range":
		return &expr.Range{}
	case "meta":
		return &expr.Meta{}
	case "cmp":
		return &expr.Cmp{}
	case "counter":
		return &expr.Counter{}
	case "objref":
		return &expr.Objref{}
	case "payload":
		return &expr.Payload{}
	case "lookup":
		return &expr.Lookup{}
	case "immediate":
		return &expr.Immediate{}
	case "bitwise":
		return &expr.Bitwise{}
	case "redir":
		return &expr.Redir{}
	case "nat":
		return &expr.NAT{}
	case "limit":
		return &expr.Limit{}
	case "quota":
		return &expr.Quota{}
	case "dynset":
		return &expr.Dynset{}
	case "log":
		return &expr.Log{}
	case "exthdr":
		return &expr.Exthdr{}
	case "match":
		return &expr.Match{}
	case "target":
		return &expr.Target{}
	case "connlimit":
		return &expr.Connlimit{}
	case "queue":
		return &expr.Queue{}
	case "reject":
		return &expr.Reject{}
	case "masq":
		return &expr.Masq{}
	case "hash":
		return &expr.Hash{}
	case "fib":
		return &expr.Fib{}
	case "numgen":
		return &expr.Numgen{}
	case "notrack":
		return &expr.Notrack{}
	case "flow_offload":
		return &expr.FlowOffload{}
	case "cthelper":
		return &expr.CtHelper{}
	case "synproxy":
		return &expr.SynProxy{}
	case "ctexpect":
		return &expr.CtExpect{}
	case "secmark":
		return &expr.SecMark{}
	case "cttimeout":
		return &expr.CtTimeout{}
	}
	return nil
}

func (n *nftSource) rawRules(t *nftables.Table, chain string) ([]*nftables.Rule, error) {
	if n.nl == nil {
		return nil, errors.New("no socket")
	}
	msgs, err := dumpRuleMsgs(n.nl, t, chain)
	if err != nil {
		return nil, err
	}
	return decodeRuleMsgs(t.Family, msgs)
}
