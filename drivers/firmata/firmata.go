// Package firmata drives the digital pins of an Arduino running
// StandardFirmata (serial, 57600 baud) as the output driver "firmata", and
// reads pins it reports as TTL inputs.
//
//	[output.firmata]
//	path = "/dev/ttyACM0"
//	baud = 57600
//	reset_wait_ms = 3000     # opening an Uno resets it: wait this long for its version report
//	pulse_ms = 1.0           # default pulse length of mode = "trigger"
//	report_inputs = [2, 3]   # pins whose changes are reported (Lines: bit n = pin n)
//	[[output.firmata.map]]
//	line = 0
//	channel = 13             # Arduino digital pin 2–69
//	mode = "level"
//
// A pin is driven high while its line is high (Open Ephys' Arduino output
// inverts this; ephysd does not, unless invert = true). Changes go out as
// Firmata's portable digital message 0x90|port, LSB (pins 0–6 of the
// port), MSB (pin 7), with the other pins of the port kept as they were:
// pin 13 high alone is 91 20 00. A 3-byte message takes 0.52 ms on the
// wire at 57600 baud; the falling edge of a trigger pulse is written by a
// Go timer (typically 20–200 µs late, more under load).
package firmata

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/drivers/serialport"
	"github.com/ephysd/ephysd/pipeline"
)

// Firmata command bytes.
const (
	DigitalMessage = 0x90 // | port
	ReportDigital  = 0xD0 // | port
	SetPinMode     = 0xF4
	ReportVersion  = 0xF9
	PinInput       = 0x00
	PinOutput      = 0x01
)

// Pin limits.
const (
	MinPin      = 2  // 0 and 1 are the serial port
	MaxPin      = 69 // Arduino Mega
	MaxInputPin = 63 // Lines is a 64-bit word
	numPorts    = (MaxPin + 8) / 8
)

// Config is the [output.firmata] table.
type Config struct {
	Path         string            `toml:"path"`
	Baud         int               `toml:"baud"`
	ResetWaitMS  int               `toml:"reset_wait_ms"`
	PulseMS      float64           `toml:"pulse_ms"`
	ReportInputs []int             `toml:"report_inputs"`
	Map          []drivers.Mapping `toml:"map"`
}

// DefaultConfig is StandardFirmata's 57600 baud, a 3 s reset wait and 1 ms
// pulses.
func DefaultConfig() Config {
	return Config{Baud: 57600, ResetWaitMS: 3000, PulseMS: 1}
}

func init() {
	drivers.RegisterSink("firmata", func() drivers.SinkConfig { c := DefaultConfig(); return &c })
}

// Check validates the configuration; an input-only board (no map) is
// allowed when inputOnly.
func (c *Config) check(inputOnly bool) error {
	if c.Path == "" {
		return errors.New("output firmata: path is empty (e.g. path = \"/dev/ttyACM0\"; `ephysd devices` lists the serial ports)")
	}
	if c.Baud <= 0 {
		return fmt.Errorf("output firmata: baud %d: must be > 0 (StandardFirmata: 57600)", c.Baud)
	}
	if c.PulseMS <= 0 {
		return fmt.Errorf("output firmata: pulse_ms %v: must be > 0", c.PulseMS)
	}
	if c.ResetWaitMS < 0 {
		return fmt.Errorf("output firmata: reset_wait_ms %d: must be ≥ 0", c.ResetWaitMS)
	}
	for _, p := range c.ReportInputs {
		if p < MinPin || p > MaxInputPin {
			return fmt.Errorf("output firmata: report_inputs pin %d: must be %d–%d", p, MinPin, MaxInputPin)
		}
		for _, m := range c.Map {
			if m.Channel == p {
				return fmt.Errorf("output firmata: pin %d is both an output (map) and in report_inputs", p)
			}
		}
	}
	if inputOnly && len(c.Map) == 0 {
		return nil
	}
	return drivers.CheckMappings("firmata", c.Map, MinPin, MaxPin)
}

// Open opens the board and makes the sink.
func (c *Config) Open(p drivers.Processors) (drivers.Sink, error) {
	if err := c.check(false); err != nil {
		return nil, err
	}
	return c.OpenBoard(&p)
}

// OpenBoard opens the board: waits for the version report, sets the pin
// modes and the initial levels, and enables reporting of ReportInputs.
// With p == nil (and no map) the board is an input only.
func (c *Config) OpenBoard(p *drivers.Processors) (*Board, error) {
	if err := c.check(p == nil); err != nil {
		return nil, err
	}
	b := &Board{cfg: *c, path: c.Path, done: make(chan struct{})}
	if len(c.Map) > 0 {
		procs := drivers.Processors{}
		if p != nil {
			procs = *p
		}
		router, err := drivers.NewRouter(c.Map, procs)
		if err != nil {
			return nil, fmt.Errorf("output firmata: %v", err)
		}
		b.router = router
	}
	b.route = b.handle
	port, _, err := serialport.Open(c.Path, serialport.Options{Baud: c.Baud, NoLowLatency: true})
	if err != nil {
		return nil, fmt.Errorf("firmata: %w", err)
	}
	b.port = port
	if err := b.waitVersion(); err != nil {
		port.Close()
		return nil, err
	}
	b.pulse = make([]time.Duration, len(c.Map))
	b.deadline = make([]time.Time, len(c.Map))
	b.timers = make([]*time.Timer, len(c.Map))
	for i, m := range c.Map {
		b.appendMsg(SetPinMode, byte(m.Channel), PinOutput)
		if m.Invert {
			b.state[m.Channel/8] |= 1 << uint(m.Channel%8)
		}
		b.dirty |= 1 << uint(m.Channel/8)
		ms := m.PulseMS
		if ms == 0 {
			ms = c.PulseMS
		}
		b.pulse[i] = time.Duration(ms * float64(time.Millisecond))
		if m.Mode == "trigger" {
			k := i
			b.timers[i] = time.AfterFunc(time.Hour, func() { b.endPulse(k) })
			b.timers[i].Stop()
		}
	}
	b.flushPorts(true)
	var report uint16
	for _, pin := range c.ReportInputs {
		b.appendMsg(SetPinMode, byte(pin), PinInput)
		report |= 1 << uint(pin/8)
	}
	for port := 0; port < numPorts; port++ {
		if report&(1<<uint(port)) != 0 {
			b.appendMsg(ReportDigital|byte(port), 1)
		}
	}
	port.SetReadTimeout(100 * time.Millisecond)
	b.at.Store(time.Now().UnixNano())
	go b.readReports()
	b.mu.Lock()
	err = b.send()
	b.mu.Unlock()
	if err != nil {
		b.Close()
		return nil, err
	}
	return b, nil
}

// waitVersion waits for the version report F9 major minor that the board
// sends when it comes out of reset; if none comes within reset_wait_ms it
// asks for it (F9) and waits one more second.
func (b *Board) waitVersion() error {
	wait := time.Duration(b.cfg.ResetWaitMS) * time.Millisecond
	if b.scanVersion(wait) {
		return nil
	}
	if _, err := b.port.Write([]byte{ReportVersion}); err != nil {
		return fmt.Errorf("firmata %s: asking for the version: %v", b.path, err)
	}
	if b.scanVersion(time.Second) {
		return nil
	}
	return fmt.Errorf("firmata %s: no Firmata version report within %v of opening, nor after asking for it — is StandardFirmata uploaded to the board, and does baud (%d) match its sketch?", b.path, wait+time.Second, b.cfg.Baud)
}

func (b *Board) scanVersion(wait time.Duration) bool {
	deadline := time.Now().Add(wait)
	var buf [64]byte
	var seen []byte
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return false
		}
		b.port.SetReadTimeout(min(left, 50*time.Millisecond))
		n, err := b.port.Read(buf[:])
		if err != nil {
			return false
		}
		seen = append(seen, buf[:n]...)
		for i := 0; i+2 < len(seen); i++ {
			if seen[i] == ReportVersion && seen[i+1] < 0x80 && seen[i+2] < 0x80 {
				b.Major, b.Minor = seen[i+1], seen[i+2]
				// What came after it (the firmware's name, an early
				// report) goes to the report parser.
				b.early = append(b.early[:0], seen[i+3:]...)
				return true
			}
		}
	}
}

// Board is an Arduino running StandardFirmata: a Sink for its output pins
// and the source of Lines for its reported input pins.
type Board struct {
	// Major, Minor is the Firmata protocol version the board reported.
	Major, Minor byte

	cfg    Config
	path   string
	port   serialport.Port
	router *drivers.Router
	route  func(drivers.Route)

	pulse    []time.Duration
	timers   []*time.Timer
	deadline []time.Time

	mu      sync.Mutex
	state   [numPorts]byte // output levels wanted
	written [numPorts]byte
	dirty   uint16 // ports with changed levels
	sample  int64
	pending bool
	out     [96]byte
	n       int
	spill   []byte
	err     error
	closed  bool

	lines   atomic.Uint64
	at      atomic.Int64
	readErr atomic.Pointer[error]
	done    chan struct{}
	early   []byte // bytes read after the version report while waiting for it

	// What the report parser counted, published after every read.
	reports, discarded, resyncs atomic.Uint64
}

// Stats are what a board's report parser counted.
type Stats struct {
	Reports        uint64 // digital port reports
	DiscardedBytes uint64 // bytes that belonged to no good message
	Resyncs        uint64 // stretches of discarded bytes between good messages
}

// Stats returns the report parser's counts.
func (b *Board) Stats() Stats {
	return Stats{Reports: b.reports.Load(), DiscardedBytes: b.discarded.Load(), Resyncs: b.resyncs.Load()}
}

// LinkStats reports the bytes the report parser discarded and how often
// it lost the message boundary (drivers.LinkCounter).
func (b *Board) LinkStats() drivers.LinkStats {
	return drivers.LinkStats{DiscardedBytes: b.discarded.Load(), Resyncs: b.resyncs.Load()}
}

// HandleEvents sets the mapped pins from b's TTL events: one port message
// per changed port and sample number, in event order, written at once.
func (b *Board) HandleEvents(blk *pipeline.Block) error {
	if b.router == nil {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.err != nil {
		return b.err
	}
	if p := b.readErr.Load(); p != nil {
		b.err = fmt.Errorf("firmata %s: %v — the board is gone (unplugged?); plug it back in", b.path, *p)
		return b.err
	}
	b.router.Each(blk, b.route)
	if b.pending {
		b.pending = false
		b.flushPorts(false)
	}
	if b.n > 0 || len(b.spill) > 0 {
		return b.send()
	}
	return nil
}

func (b *Board) handle(r drivers.Route) {
	if b.pending && r.Event.SampleNumber != b.sample {
		b.flushPorts(false)
	}
	b.sample = r.Event.SampleNumber
	b.pending = true
	level := r.Level
	if r.Mapping.Mode == "trigger" {
		if !r.Rising {
			return
		}
		level = !r.Mapping.Invert
		b.deadline[r.Index] = time.Now().Add(b.pulse[r.Index])
		b.timers[r.Index].Reset(b.pulse[r.Index])
	}
	b.setPin(r.Mapping.Channel, level)
}

func (b *Board) setPin(pin int, high bool) {
	port, bit := pin/8, byte(1)<<uint(pin%8)
	if high {
		b.state[port] |= bit
	} else {
		b.state[port] &^= bit
	}
	b.dirty |= 1 << uint(port)
}

// flushPorts appends a port message for every dirty port whose state
// changed (all dirty ports when force).
func (b *Board) flushPorts(force bool) {
	for port := 0; b.dirty != 0 && port < numPorts; port++ {
		if b.dirty&(1<<uint(port)) == 0 {
			continue
		}
		b.dirty &^= 1 << uint(port)
		v := b.state[port]
		if v == b.written[port] && !force {
			continue
		}
		b.appendMsg(DigitalMessage|byte(port), v&0x7F, v>>7)
		b.written[port] = v
	}
}

func (b *Board) appendMsg(msg ...byte) {
	if b.n+len(msg) > len(b.out) {
		b.spill = append(b.spill, b.out[:b.n]...)
		b.n = 0
	}
	b.n += copy(b.out[b.n:], msg)
}

// send writes the collected messages (b.mu held).
func (b *Board) send() error {
	msg := b.out[:b.n]
	if len(b.spill) > 0 {
		b.spill = append(b.spill, msg...)
		msg = b.spill
	}
	_, err := b.port.Write(msg)
	b.n = 0
	b.spill = b.spill[:0]
	if err != nil {
		b.err = fmt.Errorf("firmata %s: write failed: %v — the board is gone (unplugged?); plug it back in", b.path, err)
	}
	return b.err
}

// endPulse ends mapping k's trigger pulse (timer goroutine).
func (b *Board) endPulse(k int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if left := time.Until(b.deadline[k]); left > 0 {
		b.timers[k].Reset(left)
		return
	}
	if b.err != nil || b.closed {
		return
	}
	m := &b.cfg.Map[k]
	b.setPin(m.Channel, m.Invert)
	b.flushPorts(false)
	if b.n > 0 {
		b.send()
	}
}

// Lines returns the levels of the reported input pins (bit n = pin n) and
// when the last report arrived (the open time before any).
func (b *Board) Lines() (word uint64, at time.Time) {
	return b.lines.Load(), time.Unix(0, b.at.Load())
}

// Err is the error that stopped reading reports (the board unplugged), or
// nil.
func (b *Board) Err() error {
	if p := b.readErr.Load(); p != nil {
		return *p
	}
	return nil
}

// readReports parses what the board sends (ReportParser) and keeps the
// levels of the reported pins from its digital port reports.
func (b *Board) readReports() {
	defer close(b.done)
	var buf [64]byte
	var p ReportParser
	var mask uint64
	for _, pin := range b.cfg.ReportInputs {
		mask |= 1 << uint(pin)
	}
	report := func(port int, levels byte) {
		if port > 7 {
			return
		}
		pm := mask & (0xFF << (8 * uint(port)))
		w := b.lines.Load()&^pm | uint64(levels)<<(8*uint(port))&pm
		b.lines.Store(w)
		b.at.Store(time.Now().UnixNano())
	}
	feed := func(data []byte) {
		p.Feed(data, report)
		b.reports.Store(p.Reports)
		b.discarded.Store(p.Discarded)
		b.resyncs.Store(p.Resyncs)
	}
	feed(b.early)
	for {
		n, err := b.port.Read(buf[:])
		if n > 0 {
			feed(buf[:n])
		}
		if err != nil {
			b.mu.Lock()
			closed := b.closed
			b.mu.Unlock()
			if !closed {
				b.readErr.Store(&err)
			}
			return
		}
	}
}

// Close stops pending pulses, sets the outputs to their inactive levels,
// and closes the port.
func (b *Board) Close() error {
	for _, t := range b.timers {
		if t != nil {
			t.Stop()
		}
	}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return nil
	}
	if b.err == nil && b.router != nil {
		for _, m := range b.cfg.Map {
			b.setPin(m.Channel, m.Invert)
		}
		b.flushPorts(false)
		if b.n > 0 {
			b.send()
		}
	}
	b.closed = true
	b.mu.Unlock()
	err := b.port.Close()
	select {
	case <-b.done:
	case <-time.After(time.Second):
	}
	return err
}
