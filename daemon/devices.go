package daemon

import (
	"fmt"
	"io"
	"os/user"
	"strings"
	"text/tabwriter"

	"github.com/ephysd/ephysd/drivers/serialport"
	"github.com/ephysd/ephysd/drivers/usb"
)

// knownDevice says which driver would take a USB vendor/product id.
type knownDevice struct {
	vid, pid string // 4 lowercase hex digits; pid "" matches any
	name     string
	serial   string // the driver to use when it appears as a serial port
	usb      string // the driver to use through libusb
}

// knownDevices is what `ephysd devices` recognises. Several boards share
// USB-serial chips, so a line may name more than one candidate.
var knownDevices = []knownDevice{
	{"0403", "6015", "FTDI FT-X (OpenBCI dongle, Heart & Brain SpikerBox)", "openbci or spikerbox", "ftdi"},
	{"0403", "6001", "FTDI FT232R", "openbci or spikerbox", "ftdi"},
	{"0403", "6010", "FTDI FT2232", "", "ftdi"},
	{"0403", "6011", "FTDI FT4232H", "", "ftdi"},
	{"0403", "6014", "FTDI FT232H", "", "ftdi"},
	{"2e73", "", "Backyard Brains SpikerBox", "spikerbox", ""},
	{"2341", "", "Arduino", "firmata", ""},
	{"2a03", "", "Arduino (arduino.org)", "firmata", ""},
	{"1a86", "7523", "CH340 USB-serial (Arduino clone)", "firmata", ""},
	{"16c0", "0483", "Teensy (USB serial)", "stream or pulsepal", ""},
	{"2e8a", "", "Raspberry Pi RP2040", "stream", "stream"},
}

func recognise(vid, pid string) *knownDevice {
	vid, pid = strings.ToLower(vid), strings.ToLower(pid)
	for i := range knownDevices {
		k := &knownDevices[i]
		if k.vid == vid && (k.pid == "" || k.pid == pid) {
			return k
		}
	}
	return nil
}

// USBOpener lists USB devices for `ephysd devices` and opens them for the
// USB drivers; set by the build that links libusb (gousb).
var USBOpener usb.Opener

func devicesCommand(args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 {
		return usageError{fmt.Errorf("devices: takes no arguments")}
	}
	who := "this user"
	if u, err := user.Current(); err == nil {
		who = u.Username
	}
	ports, err := serialport.List()
	if err != nil {
		return fmt.Errorf("devices: listing serial ports: %w", err)
	}
	tw := tabwriter.NewWriter(stdout, 2, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "SERIAL PORT\tUSB ID\tSERIAL NO.\tDEVICE\tDRIVER\tACCESS (%s)\n", who)
	if len(ports) == 0 {
		fmt.Fprintln(tw, "(none)\t\t\t\t\t")
	}
	for _, p := range ports {
		id, name, drv := "-", p.Product, "-"
		if p.USB {
			id = p.VID + ":" + p.PID
			if k := recognise(p.VID, p.PID); k != nil {
				name = k.name
				if k.serial != "" {
					drv = k.serial
				}
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", p.Path, id, dash(p.Serial), dash(name), drv, access(p.Access))
	}
	tw.Flush()

	fmt.Fprintln(stdout)
	if USBOpener == nil {
		fmt.Fprintln(stdout, "USB devices: not listed (this build has no libusb support)")
		return nil
	}
	devs, err := USBOpener.List()
	if err != nil {
		return fmt.Errorf("devices: listing USB devices: %w", err)
	}
	tw = tabwriter.NewWriter(stdout, 2, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "USB DEVICE\tUSB ID\tSERIAL NO.\tDEVICE\tDRIVER\tACCESS (%s)\n", who)
	shown := 0
	for _, d := range devs {
		k := recognise(fmt.Sprintf("%04x", d.VID), fmt.Sprintf("%04x", d.PID))
		if k == nil || k.usb == "" {
			continue
		}
		shown++
		fmt.Fprintf(tw, "bus %d addr %d\t%04x:%04x\t%s\t%s\t%s\t%s\n", d.Bus, d.Address, d.VID, d.PID, dash(d.Serial),
			dash(strings.TrimSpace(d.Manufacturer+" "+d.Product)), k.usb, access(d.Access))
	}
	if shown == 0 {
		fmt.Fprintln(tw, "(none that ephysd drives through libusb)\t\t\t\t\t")
	}
	tw.Flush()
	return nil
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func access(reason string) string {
	if reason == "" {
		return "ok"
	}
	return reason
}
