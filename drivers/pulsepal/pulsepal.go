// Package pulsepal drives a Sanworks Pulse Pal 2 (USB CDC serial) as the
// output driver "pulsepal": TTL events fire its output channels (soft
// trigger of the channel's programmed pulse train) or set a channel to a
// fixed voltage.
//
//	[output.pulsepal]
//	path = "/dev/ttyACM0"
//	high_volts = 5.0        # level mode: voltage while the line is high
//	low_volts = 0.0         # level mode: voltage while the line is low
//	[[output.pulsepal.map]]
//	line = 0
//	channel = 1             # output channel 1–4
//	mode = "trigger"        # soft-trigger the channel on each rising edge
//
// Triggers of one sample number go out as one message (D5 4D mask), which
// the device answers with nothing; the Pulse Pal starts the trains on its
// next 50 µs cycle. Fixed voltages (D5 4F ch lo hi) are answered with 01;
// a reader goroutine counts the confirmations, so HandleEvents never waits.
//
// Firmware: the handshake (D5 48 → 4B + uint32 version) must report
// version 20 or later. Versions below 20 are the original Pulse Pal (v1),
// whose voltages are 8-bit and whose opcodes differ; the 16-bit voltage
// encoding used here is that of Pulse Pal 2 firmware (20 and up).
package pulsepal

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/drivers/serialport"
	"github.com/ephysd/ephysd/pipeline"
)

// Protocol bytes.
const (
	OpPrefix     = 0xD5
	OpHandshake  = 0x48
	OpReply      = 0x4B // handshake reply, followed by uint32 firmware version
	OpTrigger    = 0x4D
	OpVoltage    = 0x4F
	OpParameter  = 0x4A
	OpAbort      = 0x50
	OpDisconnect = 0x51
	Ack          = 0x01
)

// MinFirmware is the oldest firmware accepted (Pulse Pal 2).
const MinFirmware = 20

// HandshakeTimeout bounds the wait for the handshake reply.
var HandshakeTimeout = 2 * time.Second

// VoltageCode is the 16-bit DAC value of volts (−10…+10 V):
// ceil((V+10)/20 × 65535).
func VoltageCode(volts float64) uint16 {
	v := math.Ceil((volts + 10) / 20 * 65535)
	return uint16(max(0, min(65535, v)))
}

// Config is the [output.pulsepal] table.
type Config struct {
	Path      string            `toml:"path"`
	HighVolts float64           `toml:"high_volts"`
	LowVolts  float64           `toml:"low_volts"`
	Map       []drivers.Mapping `toml:"map"`
}

// DefaultConfig: 0 V / 5 V levels.
func DefaultConfig() Config { return Config{HighVolts: 5, LowVolts: 0} }

func init() {
	drivers.RegisterSink("pulsepal", func() drivers.SinkConfig { c := DefaultConfig(); return &c })
}

// Check validates the configuration.
func (c *Config) Check() error {
	if c.Path == "" {
		return errors.New("output pulsepal: path is empty (e.g. path = \"/dev/ttyACM0\"; `ephysd devices` lists the serial ports)")
	}
	for _, v := range []float64{c.HighVolts, c.LowVolts} {
		if v < -10 || v > 10 {
			return fmt.Errorf("output pulsepal: voltage %v: must be within −10…+10 V", v)
		}
	}
	return drivers.CheckMappings("pulsepal", c.Map, 1, 4)
}

// Open opens the device, checks the handshake and makes the sink.
func (c *Config) Open(p drivers.Processors) (drivers.Sink, error) {
	return c.OpenSink(p)
}

// OpenSink is Open with the concrete type.
func (c *Config) OpenSink(p drivers.Processors) (*Sink, error) {
	if err := c.Check(); err != nil {
		return nil, err
	}
	router, err := drivers.NewRouter(c.Map, p)
	if err != nil {
		return nil, fmt.Errorf("output pulsepal: %v", err)
	}
	port, _, err := serialport.Open(c.Path, serialport.Options{Baud: 115200, NoLowLatency: true})
	if err != nil {
		return nil, fmt.Errorf("pulsepal: %w", err)
	}
	s := &Sink{port: port, path: c.Path, router: router, cfg: *c, done: make(chan struct{})}
	s.route = s.handle
	fw, err := s.handshake()
	if err != nil {
		port.Close()
		return nil, err
	}
	s.firmware = fw
	s.lastLevel = [5]int8{-1, -1, -1, -1, -1}
	port.SetReadTimeout(100 * time.Millisecond)
	go s.readReplies()
	// Level channels start at their inactive level.
	for i, m := range c.Map {
		if m.Mode == "level" {
			s.setLevel(i, m.Invert)
		}
	}
	if err := s.send(); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

func (s *Sink) handshake() (uint32, error) {
	s.port.ResetInputBuffer()
	if _, err := s.port.Write([]byte{OpPrefix, OpHandshake}); err != nil {
		return 0, fmt.Errorf("pulsepal %s: writing the handshake: %v", s.path, err)
	}
	var reply [5]byte
	got := 0
	deadline := time.Now().Add(HandshakeTimeout)
	for got < len(reply) {
		left := time.Until(deadline)
		if left <= 0 {
			if got == 0 {
				return 0, fmt.Errorf("pulsepal %s: no handshake reply within %v — is it a Pulse Pal 2 (not in Bpod mode), and is path the right port?", s.path, HandshakeTimeout)
			}
			return 0, fmt.Errorf("pulsepal %s: incomplete handshake reply % x — is it a Pulse Pal 2 (not in Bpod mode)?", s.path, reply[:got])
		}
		s.port.SetReadTimeout(left)
		n, err := s.port.Read(reply[got:])
		if err != nil {
			return 0, fmt.Errorf("pulsepal %s: reading the handshake reply: %v", s.path, err)
		}
		got += n
		if got > 0 && reply[0] != OpReply {
			return 0, fmt.Errorf("pulsepal %s: handshake reply starts with %#02x, want 0x4b — is it a Pulse Pal 2 (not in Bpod mode, not another device)?", s.path, reply[0])
		}
	}
	fw := binary.LittleEndian.Uint32(reply[1:])
	if fw < MinFirmware {
		return fw, fmt.Errorf("pulsepal %s: firmware version %d: this is an original Pulse Pal (firmware < %d), whose protocol differs — use a Pulse Pal 2 or update its firmware", s.path, fw, MinFirmware)
	}
	return fw, nil
}

// Sink fires Pulse Pal channels from TTL events.
type Sink struct {
	port     serialport.Port
	path     string
	router   *drivers.Router
	cfg      Config
	route    func(drivers.Route)
	firmware uint32

	mu        sync.Mutex
	out       [64]byte // message bytes of the current sample
	n         int
	overflow  []byte
	mask      byte
	sample    int64
	pending   bool
	lastLevel [5]int8 // per channel: -1 unknown, 0 low, 1 high
	err       error
	closed    bool

	sentVoltage atomic.Uint64
	confirmed   atomic.Uint64
	mismatches  atomic.Uint64
	resyncs     atomic.Uint64
	lastBad     atomic.Uint32
	readErr     atomic.Pointer[error]
	done        chan struct{}
}

// Replies counts what the Pulse Pal sends back while it is driven: one
// confirmation byte (01) for every fixed-voltage or parameter message, and
// nothing else. Any other byte is a bad reply (a corrupted confirmation,
// garbage on the line); a corrupted byte that happens to be 01 cannot be
// told from a confirmation. The zero Replies is ready to use.
type Replies struct {
	Confirmed uint64 // 01 bytes
	Bad       uint64 // other bytes
	Resyncs   uint64 // stretches of bad bytes between confirmations
	LastBad   byte   // the last bad byte
	inBad     bool
}

// Feed counts the bytes of data.
func (r *Replies) Feed(data []byte) {
	for _, c := range data {
		if c == Ack {
			r.Confirmed++
			r.inBad = false
			continue
		}
		r.Bad++
		r.LastBad = c
		if !r.inBad {
			r.inBad = true
			r.Resyncs++
		}
	}
}

// Firmware is the version the device reported.
func (s *Sink) Firmware() uint32 { return s.firmware }

// Stats reports the fixed-voltage messages sent, the confirmations (01)
// read back, and the reply bytes that were not 01.
func (s *Sink) Stats() (sent, confirmed, mismatches uint64) {
	return s.sentVoltage.Load(), s.confirmed.Load(), s.mismatches.Load()
}

// LinkStats reports the reply bytes that were not confirmations, and the
// stretches of them (drivers.LinkCounter).
func (s *Sink) LinkStats() drivers.LinkStats {
	return drivers.LinkStats{DiscardedBytes: s.mismatches.Load(), Resyncs: s.resyncs.Load()}
}

// HandleEvents sends one message batch per sample number with events:
// the trigger mask of the channels with a rising edge, and the fixed
// voltages of level channels that change.
func (s *Sink) HandleEvents(b *pipeline.Block) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return s.err
	}
	if p := s.readErr.Load(); p != nil {
		s.err = fmt.Errorf("pulsepal %s: %v — the device is gone (unplugged?); plug it back in", s.path, *p)
		return s.err
	}
	s.router.Each(b, s.route)
	if s.pending {
		s.endSample()
	}
	if s.n > 0 {
		if err := s.send(); err != nil {
			return err
		}
	}
	return s.err
}

func (s *Sink) handle(r drivers.Route) {
	if s.pending && r.Event.SampleNumber != s.sample {
		s.endSample()
	}
	s.sample = r.Event.SampleNumber
	s.pending = true
	if r.Mapping.Mode == "trigger" {
		if r.Rising {
			s.mask |= 1 << uint(r.Mapping.Channel-1)
		}
		return
	}
	s.setLevel(r.Index, r.Level)
}

// setLevel appends a fixed-voltage message if mapping i's channel changes.
func (s *Sink) setLevel(i int, high bool) {
	ch := s.cfg.Map[i].Channel
	l := int8(0)
	v := s.cfg.LowVolts
	if high {
		l, v = 1, s.cfg.HighVolts
	}
	if s.lastLevel[ch] == l {
		return
	}
	s.lastLevel[ch] = l
	code := VoltageCode(v)
	s.appendMsg(OpPrefix, OpVoltage, byte(ch), byte(code), byte(code>>8))
	s.sentVoltage.Add(1)
}

// endSample appends the trigger message of the sample just finished.
func (s *Sink) endSample() {
	s.pending = false
	if s.mask != 0 {
		s.appendMsg(OpPrefix, OpTrigger, s.mask)
		s.mask = 0
	}
}

func (s *Sink) appendMsg(b ...byte) {
	if s.n+len(b) > len(s.out) {
		s.overflow = append(s.overflow, s.out[:s.n]...)
		s.n = 0
	}
	s.n += copy(s.out[s.n:], b)
}

// send writes the collected messages.
func (s *Sink) send() error {
	msg := s.out[:s.n]
	if len(s.overflow) > 0 {
		s.overflow = append(s.overflow, msg...)
		msg = s.overflow
	}
	_, err := s.port.Write(msg)
	s.n = 0
	s.overflow = s.overflow[:0]
	if err != nil {
		s.err = fmt.Errorf("pulsepal %s: write failed: %v — the device is gone (unplugged?); plug it back in", s.path, err)
	}
	return s.err
}

// readReplies counts the 01 confirmations of fixed-voltage messages.
func (s *Sink) readReplies() {
	defer close(s.done)
	var buf [64]byte
	var r Replies
	for {
		n, err := s.port.Read(buf[:])
		if n > 0 {
			r.Feed(buf[:n])
			s.confirmed.Store(r.Confirmed)
			s.mismatches.Store(r.Bad)
			s.resyncs.Store(r.Resyncs)
			s.lastBad.Store(uint32(r.LastBad))
		}
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if !closed {
				s.readErr.Store(&err)
			}
			return
		}
	}
}

// Close sends the disconnect message (the Pulse Pal returns to its own
// front panel) and closes the port.
func (s *Sink) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	if s.err == nil {
		s.port.Write([]byte{OpPrefix, OpDisconnect})
	}
	s.mu.Unlock()
	err := s.port.Close()
	select {
	case <-s.done:
	case <-time.After(time.Second):
	}
	return err
}
