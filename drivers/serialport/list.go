package serialport

import (
	"os"
	"sort"
	"strings"

	"go.bug.st/serial/enumerator"
	"golang.org/x/sys/unix"
)

// Info describes one serial port of the machine.
type Info struct {
	Path    string
	USB     bool
	VID     string // 4 lowercase hex digits, "" if not USB
	PID     string
	Serial  string
	Product string
	// Access is "" when this process may open the port read-write,
	// otherwise why not ("permission denied", …).
	Access string
}

// List returns the serial ports the kernel has (never pseudo-terminals).
func List() ([]Info, error) {
	ports, err := enumerator.GetDetailedPortsList()
	if err != nil {
		return nil, err
	}
	var out []Info
	for _, p := range ports {
		in := Info{Path: p.Name, USB: p.IsUSB, VID: strings.ToLower(p.VID), PID: strings.ToLower(p.PID), Serial: p.SerialNumber, Product: p.Product}
		if err := unix.Access(p.Name, unix.R_OK|unix.W_OK); err != nil {
			in.Access = err.Error() + " (add the service user to group " + groupOf(p.Name) + " or install systemd/99-ephysd.rules)"
		} else if _, err := os.Stat(p.Name); err != nil {
			in.Access = err.Error()
		}
		out = append(out, in)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Path < out[j].Path })
	return out, nil
}
