// Package gousbdev is the libusb implementation of usb.Opener and
// usb.Device, through github.com/google/gousb (pinned at v1.1.3: later
// versions need libusb ≥ 1.0.27, Debian 12 ships 1.0.26). It is one of the
// two places in ephysd that use cgo.
//
// Devices are found by vendor and product id (and serial number when
// several identical ones are attached); the interface is claimed with the
// kernel's driver (ftdi_sio, cdc_acm) detached from that interface only,
// and given back when the device is closed. The serial numbers, product
// and manufacturer names come from sysfs (the kernel's cached string
// descriptors), so listing devices needs no permission on the device node
// and sends nothing to the devices.
package gousbdev

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/gousb"

	"github.com/ephysd/ephysd/drivers/usb"
)

// ControlTimeout bounds every control transfer.
const ControlTimeout = time.Second

// Opener opens devices on the machine's USB buses through libusb. The zero
// value is ready to use.
type Opener struct{}

var _ usb.Opener = Opener{}

// newContext makes a libusb context; gousb panics when libusb_init fails.
func newContext() (ctx *gousb.Context, err error) {
	defer func() {
		if r := recover(); r != nil {
			ctx, err = nil, fmt.Errorf("usb: libusb could not start: %v", r)
		}
	}()
	return gousb.NewContext(), nil
}

// found is one enumerated device.
type found struct {
	desc    *gousb.DeviceDesc
	strings sysfsStrings
}

func enumerate(ctx *gousb.Context) ([]found, error) {
	var all []found
	_, err := ctx.OpenDevices(func(d *gousb.DeviceDesc) bool {
		all = append(all, found{desc: d})
		return false
	})
	if len(all) == 0 {
		// No USB bus (or nothing on it) is an empty list, not an error.
		return nil, nil
	}
	byAddr := sysfsByAddress()
	for i := range all {
		all[i].strings = byAddr[addrKey(all[i].desc.Bus, all[i].desc.Address)]
	}
	sort.Slice(all, func(i, j int) bool {
		a, b := all[i].desc, all[j].desc
		if a.Bus != b.Bus {
			return a.Bus < b.Bus
		}
		return a.Address < b.Address
	})
	return all, err
}

// List returns the devices on the machine's USB buses with their serial
// numbers and names, and whether this process may open them. With no USB
// bus at all it returns an empty list.
func (Opener) List() ([]usb.Info, error) {
	ctx, err := newContext()
	if err != nil {
		return nil, err
	}
	defer ctx.Close()
	all, err := enumerate(ctx)
	out := make([]usb.Info, 0, len(all))
	for _, f := range all {
		out = append(out, usb.Info{
			ID:           usb.ID{VID: uint16(f.desc.Vendor), PID: uint16(f.desc.Product), Serial: f.strings.serial},
			Bus:          f.desc.Bus,
			Address:      f.desc.Address,
			Manufacturer: f.strings.manufacturer,
			Product:      f.strings.product,
			Access:       accessText(f.desc.Bus, f.desc.Address),
		})
	}
	if err != nil && len(out) == 0 {
		return out, fmt.Errorf("usb: listing devices: %v", err)
	}
	return out, nil
}

// Open finds the device id, detaches the kernel driver from interface iface
// (bInterfaceNumber) of its active configuration, claims the interface and
// prepares its endpoints.
func (Opener) Open(id usb.ID, iface int) (usb.Device, error) {
	ctx, err := newContext()
	if err != nil {
		return nil, err
	}
	d, err := open(ctx, id, iface)
	if err != nil {
		ctx.Close()
		return nil, err
	}
	return d, nil
}

func open(ctx *gousb.Context, id usb.ID, iface int) (*Device, error) {
	all, _ := enumerate(ctx)
	var match []found
	for _, f := range all {
		if uint16(f.desc.Vendor) == id.VID && uint16(f.desc.Product) == id.PID {
			match = append(match, f)
		}
	}
	if len(match) == 0 {
		return nil, fmt.Errorf("usb %s: not found — is it plugged in? `ephysd devices` lists the USB devices ephysd sees: %w", id, usb.ErrNoDevice)
	}
	var pick *found
	if id.Serial != "" {
		var serials []string
		for i := range match {
			if match[i].strings.serial == "" {
				// No sysfs: ask the device itself.
				match[i].strings.serial = readSerial(ctx, match[i].desc)
			}
			if match[i].strings.serial == id.Serial {
				pick = &match[i]
			}
			serials = append(serials, quoteSerial(match[i].strings.serial))
		}
		if pick == nil {
			return nil, fmt.Errorf("usb %s: no device with that serial number (attached %04x:%04x: serials %s) — correct serial_number: %w", id, id.VID, id.PID, strings.Join(serials, ", "), usb.ErrNoDevice)
		}
	} else {
		if len(match) > 1 {
			var serials []string
			for _, f := range match {
				serials = append(serials, quoteSerial(f.strings.serial))
			}
			return nil, fmt.Errorf("usb %s: %d devices match (serials %s) — set serial_number to choose one", id, len(match), strings.Join(serials, ", "))
		}
		pick = &match[0]
	}
	desc := pick.desc
	what := fmt.Sprintf("usb %s (bus %d address %d)", id, desc.Bus, desc.Address)
	devs, err := ctx.OpenDevices(func(d *gousb.DeviceDesc) bool {
		return d.Bus == desc.Bus && d.Address == desc.Address
	})
	if len(devs) == 0 {
		if err == nil {
			err = gousb.ErrorNoDevice
		}
		return nil, classify(what, "opening", err, desc)
	}
	for _, extra := range devs[1:] {
		extra.Close()
	}
	dev := devs[0]
	dev.ControlTimeout = ControlTimeout
	d := &Device{ctx: ctx, dev: dev, what: what}
	cfgNum, err := dev.ActiveConfigNum()
	if err != nil || cfgNum == 0 {
		cfgNum = 1
	}
	// Claim the configuration before turning on auto-detach: gousb's
	// Config detaches the drivers of every interface when auto-detach is
	// on, which would take the other channel of an FT2232H away from
	// ftdi_sio. With libusb's flag set afterwards, claiming detaches the
	// driver of our interface only (and releasing reattaches it).
	d.cfg, err = dev.Config(cfgNum)
	if err != nil {
		d.Close()
		return nil, classify(what, fmt.Sprintf("selecting configuration %d", cfgNum), err, desc)
	}
	if err := dev.SetAutoDetach(true); err != nil {
		d.Close()
		return nil, classify(what, "enabling kernel driver detach", err, desc)
	}
	d.intf, err = d.cfg.Interface(iface, 0)
	if err != nil && isCode(err, gousb.ErrorOther) {
		// libusb could not detach the kernel driver (the disconnect ioctl
		// failed, e.g. because none is bound or the kernel refuses): claim
		// without detaching. If a driver does hold the interface the claim
		// fails with "busy", which says what to do.
		if dev.SetAutoDetach(false) == nil {
			d.intf, err = d.cfg.Interface(iface, 0)
		}
	}
	if err != nil {
		d.Close()
		return nil, classify(what, fmt.Sprintf("claiming interface %d", iface), err, desc)
	}
	for addr, ep := range d.intf.Setting.Endpoints {
		a := uint8(addr)
		if ep.Direction == gousb.EndpointDirectionIn {
			in, err := d.intf.InEndpoint(ep.Number)
			if err != nil {
				d.Close()
				return nil, fmt.Errorf("%s: endpoint %#02x: %v", what, a, err)
			}
			d.in[a&0x0f] = in
		} else {
			out, err := d.intf.OutEndpoint(ep.Number)
			if err != nil {
				d.Close()
				return nil, fmt.Errorf("%s: endpoint %#02x: %v", what, a, err)
			}
			d.out[a&0x0f] = out
		}
		d.maxPacket[a&0x0f|a>>7<<4] = ep.MaxPacketSize
	}
	return d, nil
}

func quoteSerial(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}

// readSerial reads the serial number string descriptor from the device
// (when sysfs does not have it); "" on any failure.
func readSerial(ctx *gousb.Context, desc *gousb.DeviceDesc) string {
	devs, _ := ctx.OpenDevices(func(d *gousb.DeviceDesc) bool {
		return d.Bus == desc.Bus && d.Address == desc.Address
	})
	s := ""
	for i, d := range devs {
		if i == 0 {
			s, _ = d.SerialNumber()
		}
		d.Close()
	}
	return s
}

// Device is one claimed interface of an opened USB device.
type Device struct {
	ctx  *gousb.Context
	dev  *gousb.Device
	cfg  *gousb.Config
	intf *gousb.Interface
	what string

	in        [16]*gousb.InEndpoint
	out       [16]*gousb.OutEndpoint
	maxPacket [32]int // index: endpoint number | direction << 4

	closeOnce sync.Once
	closeErr  error
}

var _ usb.Device = (*Device)(nil)

// String names the device.
func (d *Device) String() string { return d.what }

// Control performs a control transfer (see usb.Device).
func (d *Device) Control(requestType, request uint8, value, index uint16, data []byte) (int, error) {
	n, err := d.dev.Control(requestType, request, value, index, data)
	if err != nil {
		return n, classify(d.what, fmt.Sprintf("control request %#02x", request), err, nil)
	}
	return n, nil
}

// Read performs one bulk IN transfer (see usb.Device).
func (d *Device) Read(endpoint uint8, buf []byte, timeout time.Duration) (int, error) {
	in := d.in[endpoint&0x0f]
	if endpoint&0x80 == 0 || in == nil {
		return 0, fmt.Errorf("%s: no IN endpoint %#02x on this interface", d.what, endpoint)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	n, err := in.ReadContext(ctx, buf)
	cancel()
	if err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return n, usb.ErrTimeout
		}
		return n, classify(d.what, fmt.Sprintf("reading endpoint %#02x", endpoint), err, nil)
	}
	return n, nil
}

// Write performs a bulk OUT transfer (see usb.Device).
func (d *Device) Write(endpoint uint8, data []byte, timeout time.Duration) (int, error) {
	out := d.out[endpoint&0x0f]
	if endpoint&0x80 != 0 || out == nil {
		return 0, fmt.Errorf("%s: no OUT endpoint %#02x on this interface", d.what, endpoint)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	n, err := out.WriteContext(ctx, data)
	cancel()
	if err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return n, usb.ErrTimeout
		}
		return n, classify(d.what, fmt.Sprintf("writing endpoint %#02x", endpoint), err, nil)
	}
	return n, nil
}

// MaxPacketSize is the endpoint's wMaxPacketSize, 0 for an endpoint the
// interface does not have.
func (d *Device) MaxPacketSize(endpoint uint8) int {
	return d.maxPacket[endpoint&0x0f|endpoint>>7<<4]
}

// Close releases the interface (reattaching the kernel driver), the
// configuration, the device and the libusb context.
func (d *Device) Close() error {
	d.closeOnce.Do(func() {
		if d.intf != nil {
			d.intf.Close()
		}
		if d.cfg != nil {
			if err := d.cfg.Close(); err != nil && d.closeErr == nil {
				d.closeErr = err
			}
		}
		if d.dev != nil {
			if err := d.dev.Close(); err != nil && d.closeErr == nil {
				d.closeErr = err
			}
		}
		if err := d.ctx.Close(); err != nil && d.closeErr == nil {
			d.closeErr = err
		}
	})
	return d.closeErr
}

// classify turns a libusb failure into an error that says what to do.
// gousb wraps some errors with %v, so the text is checked as well as the
// code.
func classify(what, doing string, err error, desc *gousb.DeviceDesc) error {
	var status gousb.TransferStatus
	text := err.Error()
	isCode := func(c gousb.Error) bool { return isCode(err, c) }
	node := ""
	if desc != nil {
		node = " " + devNode(desc.Bus, desc.Address)
	}
	switch {
	case isCode(gousb.ErrorAccess):
		return fmt.Errorf("%s: %s: permission denied on%s — %s", what, doing, node, permissionRemedy)
	case isCode(gousb.ErrorBusy):
		return fmt.Errorf("%s: %s: busy — another program has claimed it (close it, or stop the other ephysd instance)", what, doing)
	case isCode(gousb.ErrorNoDevice), isCode(gousb.ErrorNotFound),
		errors.As(err, &status) && status == gousb.TransferNoDevice,
		strings.Contains(text, gousb.TransferNoDevice.String()):
		return fmt.Errorf("%s: %s: device gone — was it unplugged? (%v): %w", what, doing, err, usb.ErrNoDevice)
	case isCode(gousb.ErrorTimeout), errors.As(err, &status) && status == gousb.TransferTimedOut:
		return fmt.Errorf("%s: %s: %w", what, doing, usb.ErrTimeout)
	}
	return fmt.Errorf("%s: %s: %v", what, doing, err)
}

// isCode tells whether err is (or, wrapped by gousb with %v, mentions) the
// libusb error c.
func isCode(err error, c gousb.Error) bool {
	var code gousb.Error
	return (errors.As(err, &code) && code == c) || strings.Contains(err.Error(), c.Error())
}
