// Package usb is the small interface through which drivers talk to USB
// devices: control transfers, bulk reads and writes, close. The libusb
// implementation (gousb, cgo) lives in usb/gousbdev; tests use pure-Go
// fakes that answer byte for byte like the chip, so drivers build and test
// with CGO_ENABLED=0 and without a USB bus.
package usb

import (
	"errors"
	"fmt"
	"time"
)

// Control request types (bmRequestType) drivers use.
const (
	VendorOut = 0x40 // host-to-device, vendor, device recipient
	VendorIn  = 0xC0 // device-to-host, vendor, device recipient
)

// Device is one opened USB interface of a device.
type Device interface {
	// Control performs a control transfer. For an IN request data is
	// filled and the count read is returned.
	Control(requestType, request uint8, value, index uint16, data []byte) (int, error)
	// Read performs one bulk IN transfer on endpoint (e.g. 0x81) of up to
	// len(buf) bytes. It returns (0, ErrTimeout) when nothing came within
	// timeout.
	Read(endpoint uint8, buf []byte, timeout time.Duration) (int, error)
	// Write performs a bulk OUT transfer on endpoint (e.g. 0x02).
	Write(endpoint uint8, data []byte, timeout time.Duration) (int, error)
	// MaxPacketSize is the endpoint's wMaxPacketSize (64 full speed, 512
	// high speed for bulk).
	MaxPacketSize(endpoint uint8) int
	Close() error
}

// ID selects a device: vendor and product id, and optionally its serial
// number (when several identical devices are attached).
type ID struct {
	VID, PID uint16
	Serial   string
}

func (id ID) String() string {
	s := fmt.Sprintf("%04x:%04x", id.VID, id.PID)
	if id.Serial != "" {
		s += " serial " + id.Serial
	}
	return s
}

// Info describes a USB device on the bus.
type Info struct {
	ID
	Bus, Address int
	Manufacturer string
	Product      string
	// Access is "" when this process may open the device, otherwise why
	// not.
	Access string
}

// Opener finds and opens devices: gousbdev.Opener on a real bus, fakes in
// tests.
type Opener interface {
	// Open claims interface iface (bInterfaceNumber) of the device, after
	// detaching a kernel driver (ftdi_sio, cdc_acm) that holds it.
	Open(id ID, iface int) (Device, error)
	// List returns the devices on the bus.
	List() ([]Info, error)
}

var (
	// ErrTimeout is a transfer that did not complete in time.
	ErrTimeout = errors.New("usb: timeout")
	// ErrNoDevice is a device that is not there (never was, or was
	// unplugged).
	ErrNoDevice = errors.New("usb: no such device")
)
