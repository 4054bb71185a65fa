// Package ftdi drives the digital pins of FTDI USB chips (FT232H, FT2232H,
// FT4232H, FT232R, FT-X) in bitbang mode, through libusb (usb.Device):
// TTL outputs as the output driver "ftdi", and TTL inputs as an Input the
// daemon merges into a headstage's digital lines.
//
// The output is configured by the [output.ftdi] table:
//
//	[output.ftdi]
//	vid = 0x0403
//	pid = 0x6014             # FT232H (6001 FT232R, 6010 FT2232H, 6011 FT4232H, 6015 FT-X)
//	serial_number = ""       # needed when several identical chips are attached
//	interface = "A"          # A–D on multi-channel chips
//	pulse_ms = 1.0           # default pulse length of mode = "trigger"
//	[[output.ftdi.map]]
//	line = 0                 # event line (from add_python_event)
//	channel = 0              # pin: bit 0–7 (ADBUS0–7 on an FT232H, TXD.. on an FT232R)
//	mode = "level"           # or "trigger": a pulse of pulse_ms on each rising edge
//
// Only the mapped pins become outputs; the others stay inputs. A pin is
// high while its line is high (low with invert = true).
//
// Timing: an output change costs one bulk OUT transfer of one byte, made
// on the stage thread. The chip applies it when the host controller sends
// it: within the next USB microframe (125 µs) on a high-speed chip, the
// next frame (1 ms) on a full-speed one (FT232R, FT-X). The falling edge of
// a trigger pulse is written by a Go timer: it comes late by the timer's
// wake-up jitter (typically 20–200 µs on an idle machine, more under load)
// plus the same USB scheduling, so pulses are pulse_ms long to within
// about ±0.3 ms on a high-speed chip and ±1.2 ms on a full-speed one.
package ftdi

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/drivers/usb"
	"github.com/ephysd/ephysd/pipeline"
)

// USBOpener opens USB devices for this package. The daemon sets it to
// gousbdev.Opener{} (this package does not import the cgo transport, so
// that it builds and tests with CGO_ENABLED=0); tests set a fake.
var USBOpener usb.Opener

// FTDI vendor requests (bmRequestType 0x40 out, 0xC0 in; wIndex = channel,
// A = 1).
const (
	reqReset      = 0x00
	reqSetLatency = 0x09
	reqSetBitMode = 0x0B
	reqReadPins   = 0x0C
)

// Bit modes (the high byte of set bit mode's wValue).
const (
	ModeReset        = 0x00
	ModeAsyncBitbang = 0x01
	ModeSyncBitbang  = 0x04
)

// writeTimeout bounds a bulk write of pin levels.
const writeTimeout = 100 * time.Millisecond

// Port is one channel (interface) of an FTDI chip.
type Port struct {
	Letter    string // "A".."D"
	Interface int    // bInterfaceNumber
	Index     uint16 // wIndex of the vendor requests
	Out, In   uint8  // bulk endpoints
}

// PortByLetter returns the channel named by letter ("" means A).
func PortByLetter(letter string) (Port, error) {
	if letter == "" {
		letter = "A"
	}
	l := strings.ToUpper(letter)
	if len(l) != 1 || l[0] < 'A' || l[0] > 'D' {
		return Port{}, fmt.Errorf("interface %q: use \"A\", \"B\", \"C\" or \"D\" (the chip's channel; single-channel chips have only A)", letter)
	}
	i := int(l[0] - 'A')
	return Port{Letter: l, Interface: i, Index: uint16(i + 1), Out: uint8(2 + 2*i), In: uint8(0x81 + 2*i)}, nil
}

// Chip is an opened FTDI channel.
type Chip struct {
	Dev  usb.Device
	Port Port
	What string // "ftdi 0403:6014 serial X interface A", for errors
}

// OpenChip opens channel port of the chip id through opener, resets it and
// sets its latency timer to 1 ms.
func OpenChip(opener usb.Opener, id usb.ID, port Port) (*Chip, error) {
	what := fmt.Sprintf("ftdi %s interface %s", id, port.Letter)
	if opener == nil {
		return nil, fmt.Errorf("%s: this ephysd was built without USB support (cgo and libusb); build it with CGO_ENABLED=1", what)
	}
	dev, err := opener.Open(id, port.Interface)
	if err != nil {
		return nil, fmt.Errorf("ftdi interface %s: %w", port.Letter, err)
	}
	c := &Chip{Dev: dev, Port: port, What: what}
	if err := c.control(reqReset, 0); err != nil {
		dev.Close()
		return nil, err
	}
	if err := c.control(reqSetLatency, 1); err != nil {
		dev.Close()
		return nil, err
	}
	return c, nil
}

func (c *Chip) control(req uint8, value uint16) error {
	if _, err := c.Dev.Control(usb.VendorOut, req, value, c.Port.Index, nil); err != nil {
		return c.fail(fmt.Sprintf("control request %#02x value %#04x", req, value), err)
	}
	return nil
}

// SetBitMode sets mode with the pins of mask as outputs.
func (c *Chip) SetBitMode(mode, mask byte) error {
	return c.control(reqSetBitMode, uint16(mode)<<8|uint16(mask))
}

// ReadPins reads the instantaneous levels of the eight pins.
func (c *Chip) ReadPins() (byte, error) {
	var b [1]byte
	n, err := c.Dev.Control(usb.VendorIn, reqReadPins, 0, c.Port.Index, b[:])
	if err != nil {
		return 0, c.fail("reading pins", err)
	}
	if n != 1 {
		return 0, fmt.Errorf("%s: reading pins: got %d bytes, want 1", c.What, n)
	}
	return b[0], nil
}

// fail makes an error that names the chip and, for an unplugged one, says
// what happens next.
func (c *Chip) fail(doing string, err error) error {
	if errors.Is(err, usb.ErrNoDevice) {
		return fmt.Errorf("%s: %s: the chip is gone (unplugged?) — plug it back in: %w", c.What, doing, err)
	}
	return fmt.Errorf("%s: %s: %w", c.What, doing, err)
}

// Close closes the device.
func (c *Chip) Close() error { return c.Dev.Close() }

// Config is the [output.ftdi] table.
type Config struct {
	VID          int               `toml:"vid"`
	PID          int               `toml:"pid"`
	SerialNumber string            `toml:"serial_number"`
	Interface    string            `toml:"interface"`
	PulseMS      float64           `toml:"pulse_ms"`
	Map          []drivers.Mapping `toml:"map"`
}

// DefaultConfig is an FT232H on channel A with 1 ms trigger pulses.
func DefaultConfig() Config {
	return Config{VID: 0x0403, PID: 0x6014, Interface: "A", PulseMS: 1}
}

func init() {
	drivers.RegisterSink("ftdi", func() drivers.SinkConfig { c := DefaultConfig(); return &c })
}

// ID is the USB device the configuration selects.
func (c *Config) ID() usb.ID {
	return usb.ID{VID: uint16(c.VID), PID: uint16(c.PID), Serial: c.SerialNumber}
}

// OutputMask is the pins the mappings drive.
func (c *Config) OutputMask() byte {
	var m byte
	for _, e := range c.Map {
		m |= 1 << uint(e.Channel)
	}
	return m
}

// Check validates the configuration (and fills in the mappings' defaults).
func (c *Config) Check() error {
	if c.VID <= 0 || c.VID > 0xffff || c.PID <= 0 || c.PID > 0xffff {
		return fmt.Errorf("output ftdi: vid %#x pid %#x: must be 16-bit USB ids (FTDI: vid = 0x0403)", c.VID, c.PID)
	}
	if _, err := PortByLetter(c.Interface); err != nil {
		return fmt.Errorf("output ftdi: %v", err)
	}
	if c.PulseMS <= 0 {
		return fmt.Errorf("output ftdi: pulse_ms %v: must be > 0", c.PulseMS)
	}
	return drivers.CheckMappings("ftdi", c.Map, 0, 7)
}

// Open opens the chip through USBOpener and makes the sink.
func (c *Config) Open(p drivers.Processors) (drivers.Sink, error) {
	return c.OpenWith(USBOpener, p)
}

// OpenWith opens the chip through opener: reset, latency timer 1 ms, async
// bitbang with the mapped pins as outputs, all outputs at their inactive
// level.
func (c *Config) OpenWith(opener usb.Opener, p drivers.Processors) (*Sink, error) {
	if err := c.Check(); err != nil {
		return nil, err
	}
	router, err := drivers.NewRouter(c.Map, p)
	if err != nil {
		return nil, fmt.Errorf("output ftdi: %v", err)
	}
	port, _ := PortByLetter(c.Interface)
	chip, err := OpenChip(opener, c.ID(), port)
	if err != nil {
		return nil, err
	}
	s := &Sink{chip: chip, router: router, maps: c.Map}
	s.route = s.handle
	s.bit = make([]byte, len(c.Map))
	s.pulse = make([]time.Duration, len(c.Map))
	s.deadline = make([]time.Time, len(c.Map))
	s.timers = make([]*time.Timer, len(c.Map))
	for i, m := range c.Map {
		s.bit[i] = 1 << uint(m.Channel)
		if m.Invert {
			s.pins |= s.bit[i] // inactive level of an inverted output is high
		}
		ms := m.PulseMS
		if ms == 0 {
			ms = c.PulseMS
		}
		s.pulse[i] = time.Duration(ms * float64(time.Millisecond))
		if m.Mode == "trigger" {
			k := i
			s.timers[i] = time.AfterFunc(time.Hour, func() { s.endPulse(k) })
			s.timers[i].Stop()
		}
	}
	if err := chip.SetBitMode(ModeAsyncBitbang, c.OutputMask()); err != nil {
		chip.Close()
		return nil, err
	}
	s.buf[0] = s.pins
	if _, err := chip.Dev.Write(port.Out, s.buf[:], writeTimeout); err != nil {
		chip.Close()
		return nil, chip.fail("writing the initial pin levels", err)
	}
	s.written = s.pins
	return s, nil
}

// Sink drives the mapped pins from the events of each block.
type Sink struct {
	chip   *Chip
	router *drivers.Router
	maps   []drivers.Mapping
	route  func(drivers.Route) // s.handle, made once so HandleEvents does not allocate

	bit      []byte
	pulse    []time.Duration
	timers   []*time.Timer
	deadline []time.Time

	mu      sync.Mutex
	pins    byte // levels wanted
	written byte // levels last written
	dirty   bool
	sample  int64
	buf     [1]byte
	err     error // first write failure; sticky
	closed  bool
}

// HandleEvents sets the pins from b's TTL events: one bulk write of the pin
// byte per sample number at which they change, in event order. A trigger
// mapping raises its pin and schedules the falling edge pulse_ms later
// without waiting for it. After a write failure (the chip unplugged) it
// returns the error every time: the daemon reopens the sink.
func (s *Sink) HandleEvents(b *pipeline.Block) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return s.err
	}
	s.dirty = false
	s.router.Each(b, s.route)
	if s.dirty {
		s.flush()
	}
	return s.err
}

// handle applies one routed event (called with s.mu held).
func (s *Sink) handle(r drivers.Route) {
	if s.dirty && r.Event.SampleNumber != s.sample {
		s.flush()
	}
	s.sample = r.Event.SampleNumber
	s.dirty = true
	bit := s.bit[r.Index]
	if r.Mapping.Mode == "trigger" {
		if !r.Rising {
			return
		}
		if r.Mapping.Invert {
			s.pins &^= bit
		} else {
			s.pins |= bit
		}
		s.deadline[r.Index] = time.Now().Add(s.pulse[r.Index])
		s.timers[r.Index].Reset(s.pulse[r.Index])
		return
	}
	if r.Level {
		s.pins |= bit
	} else {
		s.pins &^= bit
	}
}

// flush writes the pin byte if it changed (s.mu held).
func (s *Sink) flush() {
	s.dirty = false
	if s.pins == s.written || s.err != nil || s.closed {
		return
	}
	s.buf[0] = s.pins
	if _, err := s.chip.Dev.Write(s.chip.Port.Out, s.buf[:], writeTimeout); err != nil {
		s.err = s.chip.fail("setting the output pins", err)
		return
	}
	s.written = s.pins
}

// endPulse ends mapping k's trigger pulse (timer goroutine).
func (s *Sink) endPulse(k int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if left := time.Until(s.deadline[k]); left > 0 {
		s.timers[k].Reset(left) // retriggered meanwhile: the pulse goes on
		return
	}
	if s.maps[k].Invert {
		s.pins |= s.bit[k]
	} else {
		s.pins &^= s.bit[k]
	}
	s.flush()
}

// Close stops pending pulses, sets the outputs to their inactive levels,
// returns the pins to inputs and closes the device.
func (s *Sink) Close() error {
	for _, t := range s.timers {
		if t != nil {
			t.Stop()
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	if s.err == nil {
		for k, m := range s.maps {
			if m.Invert {
				s.pins |= s.bit[k]
			} else {
				s.pins &^= s.bit[k]
			}
		}
		s.flush()
		s.chip.SetBitMode(ModeReset, 0)
	}
	s.closed = true
	return s.chip.Close()
}
