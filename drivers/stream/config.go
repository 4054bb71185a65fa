package stream

import (
	"fmt"
	"time"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/drivers/usb"
	"go.uber.org/zap"
)

// Default USB identity: 1209:0001 is the pid.codes test VID:PID, a
// placeholder for development boards. A device you distribute needs its
// own VID:PID (pid.codes gives open hardware projects one for free).
const (
	DefaultVID         = 0x1209
	DefaultPID         = 0x0001
	DefaultEndpointIn  = 0x81
	DefaultEndpointOut = 0x01
)

// Opener opens USB devices for the "usb" transport. The daemon sets it to
// the libusb implementation (gousbdev) in builds that have one; nil means
// the build has no USB support. Config.Opener, when set, takes precedence.
var Opener usb.Opener

// Config is the [source.stream] table of the configuration file.
type Config struct {
	// Transport is "serial" (a CDC-ACM or USB-serial port) or "usb" (USB
	// vendor-class bulk endpoints through libusb).
	Transport string `toml:"transport"`
	// Path is the serial device, e.g. /dev/ttyACM0 or a /dev/serial/by-id
	// link.
	Path string `toml:"path"`
	// Baud is the serial line rate; CDC-ACM devices ignore it.
	Baud int `toml:"baud"`
	// VID and PID select the USB device; SerialNumber picks one of several
	// identical devices.
	VID          int    `toml:"vid"`
	PID          int    `toml:"pid"`
	SerialNumber string `toml:"serial_number"`
	// Interface is the bInterfaceNumber holding the bulk endpoints.
	Interface int `toml:"interface"`
	// EndpointIn and EndpointOut are the bulk endpoint addresses.
	EndpointIn  int `toml:"endpoint_in"`
	EndpointOut int `toml:"endpoint_out"`
	// TimeoutMS is how long to wait for the handshake answer, and how long
	// the device may send nothing while streaming before ReadBlock reports
	// it stalled.
	TimeoutMS int `toml:"timeout_ms"`

	// Opener, when set, opens USB devices instead of the package's Opener
	// (tests use a fake device).
	Opener usb.Opener `toml:"-"`

	log *zap.Logger
}

// DefaultConfig returns the configuration used for keys the file leaves out.
func DefaultConfig() Config {
	return Config{
		Transport:   "serial",
		Path:        "/dev/ttyACM0",
		Baud:        115200,
		VID:         DefaultVID,
		PID:         DefaultPID,
		EndpointIn:  DefaultEndpointIn,
		EndpointOut: DefaultEndpointOut,
		TimeoutMS:   1000,
	}
}

func init() {
	drivers.RegisterSource("stream", func() drivers.SourceConfig { c := DefaultConfig(); return &c })
}

// SetLogger gives the source a logger for device messages, gaps and bad
// frames (rate-limited). Without one it logs nothing.
func (c *Config) SetLogger(l *zap.Logger) { c.log = l }

// Validate checks every value against its allowed range.
func (c *Config) Validate() error {
	switch c.Transport {
	case "serial":
		if c.Path == "" {
			return fmt.Errorf("stream: path is empty: set it to the serial device, e.g. /dev/ttyACM0")
		}
		if c.Baud < 0 {
			return fmt.Errorf("stream: baud = %d: must be positive", c.Baud)
		}
	case "usb":
		if c.VID < 0 || c.VID > 0xFFFF || c.PID < 0 || c.PID > 0xFFFF {
			return fmt.Errorf("stream: vid = %#x, pid = %#x: each must be 0–0xffff", c.VID, c.PID)
		}
		if c.Interface < 0 || c.Interface > 255 {
			return fmt.Errorf("stream: interface = %d: must be 0–255", c.Interface)
		}
		if c.EndpointIn&0x80 == 0 || c.EndpointIn > 0xFF {
			return fmt.Errorf("stream: endpoint_in = %#x: must be an IN endpoint address 0x81–0x8f", c.EndpointIn)
		}
		if c.EndpointOut&0x80 != 0 || c.EndpointOut < 1 || c.EndpointOut > 0x0F {
			return fmt.Errorf("stream: endpoint_out = %#x: must be an OUT endpoint address 0x01–0x0f", c.EndpointOut)
		}
	default:
		return fmt.Errorf("stream: transport = %q: must be \"serial\" or \"usb\"", c.Transport)
	}
	if c.TimeoutMS < 10 || c.TimeoutMS > 60000 {
		return fmt.Errorf("stream: timeout_ms = %d: must be 10–60000", c.TimeoutMS)
	}
	return nil
}

func (c *Config) timeout() time.Duration { return time.Duration(c.TimeoutMS) * time.Millisecond }

// Open validates the configuration, opens the device and performs the
// handshake, so that Info describes the device's stream. Streaming begins
// with Start.
func (c *Config) Open() (drivers.Source, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return open(*c)
}
