package reliability

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/pcpd/pcpd/internal/netlab"
)

// Experiment (issue 9, RELIABILITY.md "The flood bound", runs AA):
// PCPD_FLOOD_INGRESS=1 copies pcpd's control meter (control_in,
// control_local, the owner chains, unowned, control_meter and their sets)
// into a netdev table whose base chain hooks ingress on the serving
// interface, so a flood datagram over its owner's or source's rate is
// dropped before IP input, the defrag hook and the raw prerouting hook.
// Same rules, same limits; control_meter's notrack is left to pcpd's own
// table, which still sees every datagram the ingress copy passes (at most
// the rates the copy already enforced, which pcpd's buckets then pass).
func floodIngress(t *testing.T) bool {
	t.Helper()
	switch p := os.Getenv("PCPD_FLOOD_INGRESS"); p {
	case "":
		return false
	case "1":
		return true
	default:
		t.Fatalf("PCPD_FLOOD_INGRESS=%q: want 1", p)
		return false
	}
}

// installIngressMeter writes the netdev copy of pcpd's control meter in ns,
// its base chain on device ifc.
func installIngressMeter(t *testing.T, ns *netlab.NS, ifc string) {
	t.Helper()
	out := ns.MustRun(t, "nft", "list", "table", "inet", "pcpd")
	keep := func(kind, name string) bool {
		switch {
		case kind == "chain":
			return strings.HasPrefix(name, "owner_") || name == "control_in" || name == "control_local" ||
				name == "control_meter" || name == "unowned"
		default:
			switch name {
			case "meter6", "meter4", "owners6", "owners4", "served6", "served4", "serving_ifs":
				return true
			}
		}
		return false
	}
	var b strings.Builder
	b.WriteString("table netdev pcpd_ingress {\n")
	in, inElems := false, false
	var name string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if !in {
			if len(f) == 3 && f[2] == "{" && (f[0] == "set" || f[0] == "map" || f[0] == "chain") && keep(f[0], f[1]) {
				in, name = true, f[1]
				b.WriteString(line + "\n")
			}
			continue
		}
		if inElems {
			// The meter sets' dynamic elements are not copied.
			if strings.HasSuffix(strings.TrimSpace(line), "}") {
				inElems = false
			}
			continue
		}
		switch {
		case len(f) == 1 && f[0] == "}":
			in = false
			b.WriteString(line + "\n\n")
		case (name == "meter6" || name == "meter4") && len(f) > 0 && f[0] == "elements":
			inElems = !strings.HasSuffix(strings.TrimSpace(line), "}")
		case len(f) == 1 && f[0] == "notrack":
		case len(f) > 1 && f[0] == "type" && name == "control_in":
			b.WriteString("\t\ttype filter hook ingress device \"" + ifc + "\" priority -500; policy accept;\n")
		default:
			b.WriteString(line + "\n")
		}
	}
	b.WriteString("}\n")
	file := filepath.Join(t.TempDir(), "ingress.nft")
	if err := os.WriteFile(file, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	ns.MustRun(t, "nft", "-f", file)
	t.Logf("ingress meter (PCPD_FLOOD_INGRESS): %s", strings.ReplaceAll(ns.MustRun(t, "nft", "list", "chain", "netdev", "pcpd_ingress", "control_in"), "\n", " "))
}

// cpuTicks is CPU cpu's line of /proc/stat: softirq and idle (USER_HZ
// ticks, machine-wide).
type cpuTicks struct{ softirq, system, idle uint64 }

func readCPUTicks(cpu int) cpuTicks {
	b, _ := os.ReadFile("/proc/stat")
	want := "cpu" + strconv.Itoa(cpu)
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 7 && f[0] == want {
			return cpuTicks{softirq: parseUint(f[7]), system: parseUint(f[3]), idle: parseUint(f[4])}
		}
	}
	return cpuTicks{}
}
