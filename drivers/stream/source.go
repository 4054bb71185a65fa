package stream

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/drivers/serialport"
	"github.com/ephysd/ephysd/drivers/usb"
	"github.com/ephysd/ephysd/pipeline"
	"go.uber.org/zap"
)

// Stream description.
const (
	ProcessorID        = 100
	StreamName         = "stream"
	TTLChannelName     = "TTL Input"
	DefaultProcessName = "Stream Headstage"
)

// pollInterval bounds how long one transport read waits, and so how long
// Stop takes to end a pending ReadBlock.
const pollInterval = 20 * time.Millisecond

// readSize is the size of one transport read (a multiple of every bulk
// max packet size).
const readSize = 16384

// Stats counts what the source has seen since Open.
type Stats struct {
	Frames         uint64 // good frames (all types)
	DataFrames     uint64 // good DATA frames delivered
	Samples        uint64 // samples delivered
	BadFrames      uint64 // frames dropped for a CRC mismatch
	Malformed      uint64 // DATA frames whose length did not fit the layout
	DiscardedBytes uint64 // bytes that belonged to no good frame
	Resyncs        uint64 // stretches of discarded bytes: times the frame boundary was lost and found again
	Gaps           uint64 // jumps in sample numbers
	MissingSamples uint64 // samples missing in those jumps
	DeviceErrors   uint64 // ERROR frames
}

// Source is a headstage speaking the ephysd stream protocol. Make one with
// Config.Open. ReadBlock must be called from one goroutine; Stop may be
// called from any.
type Source struct {
	cfg  Config
	tr   transport
	log  *zap.Logger
	ann  Announce
	lay  Layout
	info pipeline.StreamInfo

	scale []float32
	dec   *Decoder
	rbuf  []byte
	roff  int
	rn    int

	cur     Data
	curI    int
	next    uint64 // expected sample number of the next DATA frame
	hasNext bool
	lastRx  time.Time
	seen    DecoderStats

	wmu     sync.Mutex
	wbuf    []byte
	started atomic.Bool
	stopped atomic.Bool
	closed  atomic.Bool

	stats struct {
		dataFrames, samples, malformed, gaps, missing, devErrors atomic.Uint64
		frames, bad, discarded, resyncs                          atomic.Uint64
	}
	gapLog, badLog, msgLog limiter
}

// transport moves bytes to and from the device.
type transport interface {
	// read waits up to timeout for bytes; (0, nil) when none came.
	read(p []byte, timeout time.Duration) (int, error)
	write(p []byte) error
	// flush drops bytes buffered from before the handshake, where it can.
	flush()
	close() error
	// String names the device in errors: "serial /dev/ttyACM0".
	String() string
}

func open(cfg Config) (*Source, error) {
	log := cfg.log
	if log == nil {
		log = zap.NewNop()
	}
	var tr transport
	switch cfg.Transport {
	case "serial":
		p, _, err := serialport.Open(cfg.Path, serialport.Options{Baud: cfg.Baud})
		if err != nil {
			return nil, fmt.Errorf("stream: %w", err)
		}
		tr = &serialTransport{port: p, path: cfg.Path, timeout: -2}
	case "usb":
		op := cfg.Opener
		if op == nil {
			op = Opener
		}
		id := usb.ID{VID: uint16(cfg.VID), PID: uint16(cfg.PID), Serial: cfg.SerialNumber}
		if op == nil {
			return nil, fmt.Errorf("stream usb %v: usb transport not available in this build — build ephysd with cgo and libusb (gousbdev), or use transport = \"serial\" with CDC-ACM firmware", id)
		}
		dev, err := op.Open(id, cfg.Interface)
		if err != nil {
			if errors.Is(err, usb.ErrNoDevice) {
				return nil, fmt.Errorf("stream usb %v: no such device — is it plugged in and running the stream firmware? (`ephysd devices` lists USB devices): %w", id, err)
			}
			return nil, fmt.Errorf("stream usb %v interface %d: %w", id, cfg.Interface, err)
		}
		tr = &usbTransport{dev: dev, id: id, in: uint8(cfg.EndpointIn), out: uint8(cfg.EndpointOut), timeout: cfg.timeout()}
	}
	s := &Source{cfg: cfg, tr: tr, log: log, dec: NewDecoder(0), rbuf: make([]byte, readSize), wbuf: make([]byte, 0, 64)}
	s.gapLog.every, s.badLog.every, s.msgLog.every = time.Second, time.Second, 100*time.Millisecond
	if err := s.handshake(); err != nil {
		tr.close()
		return nil, err
	}
	return s, nil
}

// handshake sends HELLO and waits for the ANNOUNCE.
func (s *Source) handshake() error {
	s.tr.flush()
	if err := s.send(func(b []byte) []byte { return AppendHello(b) }); err != nil {
		return err
	}
	timeout := s.cfg.timeout()
	deadline := time.Now().Add(timeout)
	var got int
	var first [32]byte
	var nfirst int
	for {
		left := time.Until(deadline)
		if left <= 0 {
			break
		}
		n, err := s.tr.read(s.rbuf, min(left, 100*time.Millisecond))
		if err != nil {
			return fmt.Errorf("stream %v: reading the handshake answer: %w", s.tr, err)
		}
		got += n
		nfirst += copy(first[nfirst:], s.rbuf[:n])
		for off := 0; off < n; {
			off += s.dec.Feed(s.rbuf[off:n])
			for {
				f, ok := s.dec.Next()
				if !ok {
					break
				}
				switch f.Type {
				case TypeAnnounce:
					a, err := ParseAnnounce(f.Payload)
					var ve *VersionError
					if errors.As(err, &ve) {
						return fmt.Errorf("stream %v: %w", s.tr, err)
					}
					if err != nil {
						return fmt.Errorf("stream %v: the device's ANNOUNCE is invalid: %v — a firmware bug; see docs/stream-protocol.md", s.tr, err)
					}
					s.setAnnounce(a)
					// What follows the ANNOUNCE stays in the decoder for
					// ReadBlock.
					if off < n {
						s.roff, s.rn = off, n
					}
					return nil
				case TypeError:
					e, err := ParseError(f.Payload)
					if err != nil {
						return fmt.Errorf("stream %v: the handshake answer is a malformed ERROR frame", s.tr)
					}
					if e.Code == ErrCodeVersion {
						return fmt.Errorf("stream %v: %w (device says: %s)", s.tr, &VersionError{Device: e.Data}, e.Text)
					}
					return fmt.Errorf("stream %v: the device refused the handshake: %v", s.tr, e)
				case TypeLog:
					s.deviceLog(f.Payload)
				}
				// DATA frames from a stream still running from before
				// are dropped: the device stops streaming on HELLO.
			}
		}
	}
	switch st := s.dec.Stats(); {
	case got == 0:
		return fmt.Errorf("stream %v: no answer to the handshake within %v — is the firmware running? (is the board programmed with stream-protocol firmware, and is this its port?)", s.tr, timeout)
	case st.Frames == 0:
		return fmt.Errorf("stream %v: %d bytes in answer to the handshake but no valid frame (first bytes: % x) — is this device running ephysd stream firmware (docs/stream-protocol.md)? For a USB-serial adapter, check baud", s.tr, got, first[:nfirst])
	default:
		return fmt.Errorf("stream %v: %d frames in answer to the handshake but no ANNOUNCE within %v — the firmware must answer HELLO with ANNOUNCE (docs/stream-protocol.md)", s.tr, st.Frames, timeout)
	}
}

func (s *Source) setAnnounce(a Announce) {
	s.ann = a
	s.lay = a.Layout()
	s.dec.SetMaxPayload(s.lay.MaxPayload())
	s.scale = make([]float32, a.Channels)
	for c := range s.scale {
		s.scale[c] = a.Scale(c)
	}
	name := strings.Map(func(r rune) rune {
		if r == '.' || r == '/' || r == '\\' || r < ' ' || r == 0x7f {
			return '_'
		}
		return r
	}, strings.TrimSpace(a.Name))
	if name == "" {
		name = DefaultProcessName
	}
	s.info = pipeline.StreamInfo{
		ProcessorName:  name,
		ProcessorID:    ProcessorID,
		StreamName:     StreamName,
		SampleRate:     a.Rate(),
		Channels:       make([]pipeline.ChannelInfo, a.Channels),
		TTLLines:       8 * a.DigitalBytes,
		TTLChannelName: TTLChannelName,
	}
	desc := fmt.Sprintf("%s channel, %v", strings.TrimSpace(a.Name+" "+a.Serial), a.Format)
	for c := range s.info.Channels {
		s.info.Channels[c] = pipeline.ChannelInfo{
			Name:        fmt.Sprintf("CH%d", c+1),
			Units:       "uV",
			BitVolts:    BitVolts(a.Format, s.scale[c]),
			Description: desc,
		}
	}
}

// BitVolts is the recording resolution of a channel with the given format
// and scale (µV per count): the scale itself for int16 samples; for wider
// samples the scale times 2^(bits−16), so that the device's full range fits
// the int16 recording.
func BitVolts(f Format, scale float32) float64 {
	return float64(scale) * float64(int64(1)<<(f.Bits()-16))
}

// Info describes the stream, as the device announced it.
func (s *Source) Info() pipeline.StreamInfo { return s.info }

// Announce returns the device's ANNOUNCE.
func (s *Source) Announce() Announce { return s.ann }

// Stats returns the counts so far. It may be called from any goroutine.
func (s *Source) Stats() Stats {
	return Stats{
		Frames:         s.stats.frames.Load(),
		DataFrames:     s.stats.dataFrames.Load(),
		Samples:        s.stats.samples.Load(),
		BadFrames:      s.stats.bad.Load(),
		Malformed:      s.stats.malformed.Load(),
		DiscardedBytes: s.stats.discarded.Load(),
		Resyncs:        s.stats.resyncs.Load(),
		Gaps:           s.stats.gaps.Load(),
		MissingSamples: s.stats.missing.Load(),
		DeviceErrors:   s.stats.devErrors.Load(),
	}
}

// send writes one command frame.
func (s *Source) send(appendFrame func([]byte) []byte) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.wbuf = appendFrame(s.wbuf[:0])
	if err := s.tr.write(s.wbuf); err != nil {
		return fmt.Errorf("stream %v: writing to the device: %w — was it unplugged?", s.tr, err)
	}
	return nil
}

// Start tells the device to start streaming.
func (s *Source) Start() error {
	if s.closed.Load() {
		return fmt.Errorf("stream %v: Start after Close", s.tr)
	}
	if s.started.Swap(true) {
		return drivers.ErrAlreadyStarted
	}
	s.lastRx = time.Now()
	return s.send(AppendStart)
}

// Stop tells the device to stop streaming and makes a pending ReadBlock,
// and every later one, return io.EOF (within about 20 ms).
func (s *Source) Stop() error {
	if s.stopped.Swap(true) || s.closed.Load() {
		return nil
	}
	return s.send(AppendStop)
}

// Close stops the stream and releases the device.
func (s *Source) Close() error {
	s.Stop()
	if s.closed.Swap(true) {
		return nil
	}
	return s.tr.close()
}

// ReadBlock fills b with the next samples: b.Cap() of them, or fewer when a
// gap in the device's sample numbers ends the block early (the next block
// then starts at the new number). Samples of frames lost or dropped for a
// bad CRC are never filled in. It returns io.EOF after Stop.
func (s *Source) ReadBlock(b *pipeline.Block) error {
	if s.stopped.Load() {
		return io.EOF
	}
	if !s.started.Load() {
		return fmt.Errorf("stream %v: ReadBlock before Start", s.tr)
	}
	if b.Channels != s.ann.Channels {
		return fmt.Errorf("stream %v: block has %d channels, the device has %d", s.tr, b.Channels, s.ann.Channels)
	}
	stride := b.Cap()
	b.Samples = stride
	pos := 0
	for {
		if left := s.cur.Samples - s.curI; left > 0 {
			if pos == 0 {
				b.FirstSample = int64(s.cur.First) + int64(s.curI)
			}
			k := min(left, stride-pos)
			s.cur.Scale(s.curI, k, b.Data, stride, pos, s.scale, b.Digital)
			s.curI += k
			pos += k
			s.stats.samples.Add(uint64(k))
			if pos == stride {
				return nil
			}
			continue
		}
		if f, ok := s.dec.Next(); ok {
			d, isData, err := s.frame(f)
			if err != nil {
				return err
			}
			if !isData {
				continue
			}
			if s.hasNext && d.First != s.next {
				if d.First < s.next {
					return fmt.Errorf("stream %v: sample numbers went back from %d to %d — the device restarted its count (was it reset?); ephysd reopens it", s.tr, s.next, d.First)
				}
				s.gap(s.next, d.First)
			}
			s.cur, s.curI = d, 0
			gap := s.hasNext && d.First != s.next
			s.next, s.hasNext = d.First+uint64(d.Samples), true
			if gap && pos > 0 {
				b.Truncate(pos)
				return nil
			}
			continue
		}
		s.syncStats()
		if s.roff < s.rn {
			s.roff += s.dec.Feed(s.rbuf[s.roff:s.rn])
			continue
		}
		if s.stopped.Load() {
			return io.EOF
		}
		n, err := s.tr.read(s.rbuf, pollInterval)
		if err != nil {
			if s.stopped.Load() {
				return io.EOF
			}
			return fmt.Errorf("stream %v: read failed: %w — the device was unplugged or reset; ephysd reopens it when it is back", s.tr, err)
		}
		s.roff, s.rn = 0, n
		if n == 0 {
			if s.stopped.Load() {
				return io.EOF
			}
			if since := time.Since(s.lastRx); since > s.cfg.timeout() {
				return fmt.Errorf("stream %v: no data for %v while streaming — the device stopped sending (firmware crash or hang? see its ERROR/LOG messages); ephysd reopens it", s.tr, since.Round(time.Millisecond))
			}
		}
	}
}

// frame handles one frame in ReadBlock: DATA frames are returned, the rest
// logged or ignored.
func (s *Source) frame(f Frame) (Data, bool, error) {
	switch f.Type {
	case TypeData:
		d, err := s.lay.Data(f.Payload)
		if err != nil {
			s.stats.malformed.Add(1)
			if s.badLog.allow() {
				s.log.Warn("stream: DATA frame does not fit the announced layout; dropped (its samples become a gap)",
					zap.Stringer("device", s.tr), zap.Int("payload_bytes", len(f.Payload)), zap.Int("sample_bytes", s.lay.SampleBytes()),
					zap.Uint64("malformed_total", s.stats.malformed.Load()), zap.Uint64("suppressed", s.badLog.take()))
			}
			return Data{}, false, nil
		}
		s.lastRx = time.Now()
		s.stats.dataFrames.Add(1)
		return d, true, nil
	case TypeLog:
		s.deviceLog(f.Payload)
	case TypeError:
		s.stats.devErrors.Add(1)
		e, err := ParseError(f.Payload)
		if err != nil {
			break
		}
		if e.Code == ErrCodeHardware {
			return Data{}, false, fmt.Errorf("stream %v: the device reports %v; ephysd reopens it", s.tr, e)
		}
		if s.msgLog.allow() {
			s.log.Warn("stream: device error", zap.Stringer("device", s.tr), zap.String("error", e.Error()), zap.Uint64("suppressed", s.msgLog.take()))
		}
	}
	return Data{}, false, nil
}

func (s *Source) gap(from, to uint64) {
	s.stats.gaps.Add(1)
	s.stats.missing.Add(to - from)
	if s.gapLog.allow() {
		s.log.Warn("stream: gap in sample numbers (lost or bad frames); recorded as a gap, not filled",
			zap.Stringer("device", s.tr), zap.Uint64("from", from), zap.Uint64("to", to), zap.Uint64("missing", to-from),
			zap.Uint64("gaps_total", s.stats.gaps.Load()), zap.Uint64("suppressed", s.gapLog.take()))
	}
}

// syncStats publishes the decoder's counts and logs new bad frames.
func (s *Source) syncStats() {
	st := s.dec.Stats()
	if st == s.seen {
		return
	}
	if st.BadFrames != s.seen.BadFrames || st.Discarded != s.seen.Discarded {
		if s.badLog.allow() {
			s.log.Warn("stream: bytes discarded (bad CRC or garbage between frames)", zap.Stringer("device", s.tr),
				zap.Uint64("bad_frames_total", st.BadFrames), zap.Uint64("discarded_bytes_total", st.Discarded), zap.Uint64("suppressed", s.badLog.take()))
		}
	}
	s.seen = st
	s.stats.frames.Store(st.Frames)
	s.stats.bad.Store(st.BadFrames)
	s.stats.discarded.Store(st.Discarded)
	s.stats.resyncs.Store(st.Resyncs)
}

// LinkStats reports the bytes the decoder discarded and how often it lost
// the frame boundary (drivers.LinkCounter).
func (s *Source) LinkStats() drivers.LinkStats {
	return drivers.LinkStats{DiscardedBytes: s.stats.discarded.Load(), Resyncs: s.stats.resyncs.Load()}
}

func (s *Source) deviceLog(p []byte) {
	if len(p) < 1 || !s.msgLog.allow() {
		return
	}
	lvl := map[uint8]func(string, ...zap.Field){LogDebug: s.log.Debug, LogInfo: s.log.Info, LogWarn: s.log.Warn}[p[0]]
	if lvl == nil {
		lvl = s.log.Error
	}
	lvl("stream: device says", zap.Stringer("device", s.tr), zap.String("text", string(p[1:])), zap.Uint64("suppressed", s.msgLog.take()))
}

// limiter lets one log line through per interval and counts the rest.
type limiter struct {
	every      time.Duration
	last       time.Time
	suppressed uint64
}

func (l *limiter) allow() bool {
	now := time.Now()
	if now.Sub(l.last) < l.every {
		l.suppressed++
		return false
	}
	l.last = now
	return true
}

func (l *limiter) take() uint64 { n := l.suppressed; l.suppressed = 0; return n }

type serialTransport struct {
	port    serialport.Port
	path    string
	timeout time.Duration
}

func (t *serialTransport) read(p []byte, timeout time.Duration) (int, error) {
	if timeout != t.timeout {
		if err := t.port.SetReadTimeout(timeout); err != nil {
			return 0, err
		}
		t.timeout = timeout
	}
	return t.port.Read(p)
}

func (t *serialTransport) write(p []byte) error {
	_, err := t.port.Write(p)
	return err
}

func (t *serialTransport) flush()         { t.port.ResetInputBuffer() }
func (t *serialTransport) close() error   { return t.port.Close() }
func (t *serialTransport) String() string { return "serial " + t.path }

type usbTransport struct {
	dev     usb.Device
	id      usb.ID
	in, out uint8
	timeout time.Duration
}

func (t *usbTransport) read(p []byte, timeout time.Duration) (int, error) {
	// A bulk IN transfer must be a whole number of max packets, or a
	// device packet may overflow it.
	if mps := t.dev.MaxPacketSize(t.in); mps > 0 && len(p) >= mps {
		p = p[:len(p)/mps*mps]
	}
	n, err := t.dev.Read(t.in, p, timeout)
	if errors.Is(err, usb.ErrTimeout) {
		return n, nil
	}
	return n, err
}

func (t *usbTransport) write(p []byte) error {
	_, err := t.dev.Write(t.out, p, t.timeout)
	return err
}

func (t *usbTransport) flush() {
	// Drop what the device queued before the handshake.
	var buf [4096]byte
	for i := 0; i < 64; i++ {
		if n, err := t.read(buf[:], time.Millisecond); n == 0 || err != nil {
			return
		}
	}
}

func (t *usbTransport) close() error   { return t.dev.Close() }
func (t *usbTransport) String() string { return "usb " + t.id.String() }
