package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/ipc"
	"golang.zx2c4.com/wireguard/tun"
)

// newWireGuardDeviceCmd runs a userspace WireGuard interface in the
// foreground: the lab's tunnel, so that the lab needs nothing but this
// binary (no wireguard-go, no kernel module). It is hidden: production
// tunnels belong to the kernel's WireGuard or a packaged wireguard-go.
func newWireGuardDeviceCmd() *cobra.Command {
	var mtu int
	cmd := &cobra.Command{
		Use:    "wireguard-device IFNAME",
		Short:  "Run a userspace WireGuard interface in the foreground (for the lab)",
		Long:   "Create the TUN interface IFNAME, run WireGuard on it with golang.zx2c4.com/wireguard, and serve its configuration socket in /var/run/wireguard (so `wg` and wgctrl can configure it) until SIGINT or SIGTERM. The lab starts one in each tunnel namespace.",
		Hidden: true,
		Args:   cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			level := device.LogLevelError
			if os.Getenv("LOG_LEVEL") == "debug" {
				level = device.LogLevelVerbose
			}
			logger := device.NewLogger(level, fmt.Sprintf("(%s) ", name))
			tdev, err := tun.CreateTUN(name, mtu)
			if err != nil {
				return failure(fmt.Errorf("wireguard-device: create TUN %s: %w", name, err))
			}
			if real, err := tdev.Name(); err == nil {
				name = real
			}
			uapiFile, err := ipc.UAPIOpen(name)
			if err != nil {
				tdev.Close()
				return failure(fmt.Errorf("wireguard-device: open UAPI socket: %w", err))
			}
			dev := device.NewDevice(tdev, conn.NewDefaultBind(), logger)
			defer dev.Close()
			uapi, err := ipc.UAPIListen(name, uapiFile)
			if err != nil {
				return failure(fmt.Errorf("wireguard-device: listen on UAPI socket: %w", err))
			}
			defer uapi.Close()
			errs := make(chan error, 1)
			go func() {
				for {
					c, err := uapi.Accept()
					if err != nil {
						errs <- err
						return
					}
					go dev.IpcHandle(c)
				}
			}()
			select {
			case <-cmd.Context().Done():
				return nil
			case <-dev.Wait():
				return nil
			case err := <-errs:
				return failure(fmt.Errorf("wireguard-device: UAPI: %w", err))
			}
		},
	}
	cmd.Flags().IntVar(&mtu, "mtu", 1420, "interface MTU")
	return cmd
}
