// Command tsportmap drives Tailscale's port-mapping client
// (tailscale.com/net/portmapper, the one tailscaled uses) with PCP only:
// it maps -port (UDP) on -self through the PCP server at -gw, prints
// "external ADDR:PORT", waits until its standard input closes, releases
// the mapping (the client's own delete) and prints "released".
//
// It is its own module so that Tailscale's dependency tree never enters
// pcpd's go.mod; the interop tests build it and run it inside the client
// namespace.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"net/netip"
	"os"
	"time"

	"tailscale.com/net/netmon"
	"tailscale.com/net/portmapper"
	"tailscale.com/util/eventbus"
)

func main() {
	gw := flag.String("gw", "", "gateway (PCP server) IPv4 address")
	self := flag.String("self", "", "this host's IPv4 address on the gateway's link")
	port := flag.Uint("port", 41641, "local UDP port to map")
	flag.Parse()
	log.SetFlags(log.Lmicroseconds)
	gwAddr, err := netip.ParseAddr(*gw)
	if err != nil {
		log.Fatalf("tsportmap: -gw: %v", err)
	}
	selfAddr, err := netip.ParseAddr(*self)
	if err != nil {
		log.Fatalf("tsportmap: -self: %v", err)
	}

	bus := eventbus.New()
	defer bus.Close()
	nm, err := netmon.New(bus, log.Printf)
	if err != nil {
		log.Fatalf("tsportmap: netmon: %v", err)
	}
	defer nm.Close()
	yes := func() bool { return true }
	c := portmapper.NewClient(portmapper.Config{
		EventBus: bus,
		NetMon:   nm,
		Logf:     log.Printf,
		// PCP only: pcpd also speaks NAT-PMP, which Tailscale would
		// otherwise prefer.
		DebugKnobs: &portmapper.DebugKnobs{VerboseLogs: true, DisablePMPFunc: yes, DisableUPnPFunc: yes},
	})
	c.SetGatewayLookupFunc(func() (netip.Addr, netip.Addr, bool) { return gwAddr, selfAddr, true })
	c.SetLocalPort(uint16(*port))

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	res, err := c.Probe(ctx)
	cancel()
	if err != nil {
		log.Fatalf("tsportmap: probe: %v", err)
	}
	fmt.Printf("probe pcp=%v pmp=%v upnp=%v\n", res.PCP, res.PMP, res.UPnP)

	deadline := time.Now().Add(10 * time.Second)
	for {
		if ext, ok := c.GetCachedMappingOrStartCreatingOne(); ok {
			fmt.Printf("external %s\n", ext)
			break
		}
		if time.Now().After(deadline) {
			log.Fatal("tsportmap: no mapping within 10 s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	io.Copy(io.Discard, os.Stdin)
	c.Close() // sends the PCP delete (lifetime 0) synchronously
	fmt.Println("released")
}
