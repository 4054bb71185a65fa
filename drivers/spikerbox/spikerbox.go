package spikerbox

import (
	"errors"
	"fmt"
	"math"
	"math/bits"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/drivers/serialport"
	"github.com/ephysd/ephysd/pipeline"
)

// Stream description.
const (
	ProcessorName  = "SpikerBox"
	ProcessorID    = 100
	StreamName     = "spikerbox"
	TTLChannelName = "Expansion port events"
)

// ringSeconds is how much data the source buffers between the reader and
// ReadBlock.
const ringSeconds = 4

// Stats are the source's counters.
type Stats struct {
	Frames         uint64 // samples (frames) received
	DiscardedBytes uint64 // bytes dropped while resynchronising
	Resyncs        uint64 // stretches of discarded bytes: times the frame boundary was lost and found again
	// Gaps and LostSamples are the gaps in sample numbers left for the
	// discarded bytes: as many samples as they would have filled, rounded
	// up (the protocol has no sample counter; see Frame.Skipped).
	Gaps            uint64
	LostSamples     uint64
	BrokenFrames    uint64 // frames started but dropped
	Messages        uint64 // device message blocks
	Abandoned       uint64 // message blocks without an end sequence
	Events          uint64 // EVNT messages turned into TTL pulses
	UnknownEvents   uint64 // EVNT messages with a number outside 0–9
	OverflowSamples uint64 // dropped because ReadBlock was not called in time (a gap)
}

// Source is a SpikerBox. Make one with Config.Open or New. ReadBlock must
// be called from one goroutine; Stop may be called from any.
type Source struct {
	cfg     Config
	info    pipeline.StreamInfo
	port    serialport.Port
	latency serialport.Latency
	log     *zap.Logger
	centre  float32
	scale   float32
	pulse   int32 // samples a line stays high per event

	frameFn func(*Frame)
	msgFn   func(key, value []byte)

	// queue hands samples from the reader to ReadBlock; its lock also
	// guards everything below and the parser.
	queue  *drivers.SampleQueue
	parser *Parser
	nch    int
	row    []float32 // one scaled frame
	next   int64     // sample number of the next frame
	gaps   uint64
	// event pulses
	word    uint64
	remain  [64]int32
	pending uint64
	events  uint64
	unknown uint64

	stopOnce   sync.Once
	closing    atomic.Bool
	started    bool
	readerDone chan struct{}

	discardLog, eventLog pipeline.LogLimiter
	reportedDiscarded    uint64
}

// New opens the serial device of a configuration that has passed Validate.
func New(cfg Config) (*Source, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	port, lat, err := serialport.Open(cfg.Path, serialport.Options{Baud: cfg.Baud})
	if err != nil {
		return nil, fmt.Errorf("spikerbox: %w", err)
	}
	s := &Source{
		cfg:     cfg,
		port:    port,
		latency: lat,
		log:     zap.NewNop(),
		centre:  float32(int(1) << (cfg.Bits - 1)),
		scale:   float32(cfg.ScaleUV),
		pulse:   int32(max(1, math.Round(cfg.EventPulseMS*cfg.Rate/1000))),
		parser:  NewParser(cfg.Channels, cfg.Bits),
		nch:     cfg.Channels,
		queue:   drivers.NewSampleQueue(cfg.Channels, int(math.Ceil(cfg.Rate*ringSeconds))),
		row:     make([]float32, cfg.Channels),
	}
	s.frameFn = s.onFrame
	s.msgFn = s.onMessage
	s.info = pipeline.StreamInfo{
		ProcessorName:  ProcessorName,
		ProcessorID:    ProcessorID,
		StreamName:     StreamName,
		SampleRate:     cfg.Rate,
		TTLLines:       EventLines,
		TTLChannelName: TTLChannelName,
	}
	for c := 0; c < cfg.Channels; c++ {
		s.info.Channels = append(s.info.Channels, pipeline.ChannelInfo{
			Name: "CH" + strconv.Itoa(c+1), Units: "uV", BitVolts: cfg.ScaleUV,
			Description: fmt.Sprintf("SpikerBox channel, %d-bit ADC centred at %d", cfg.Bits, 1<<(cfg.Bits-1)),
		})
	}
	return s, nil
}

// SetLogger sets where the source logs the box's messages (board type,
// hardware, firmware) and resynchronisations (rate-limited). Call it before
// Start; the default discards logs.
func (s *Source) SetLogger(l *zap.Logger) {
	if l == nil {
		l = zap.NewNop()
	}
	s.log = l.With(zap.String("source", "spikerbox"), zap.String("path", s.cfg.Path))
}

// Info describes the stream.
func (s *Source) Info() pipeline.StreamInfo { return s.info }

// Stats returns a snapshot of the counters.
func (s *Source) Stats() Stats {
	s.queue.Lock()
	defer s.queue.Unlock()
	return s.statsLocked()
}

func (s *Source) statsLocked() Stats {
	p := s.parser
	return Stats{Frames: p.Frames, DiscardedBytes: p.Discarded, Resyncs: p.Resyncs, Gaps: s.gaps, LostSamples: p.Skipped,
		BrokenFrames: p.BrokenFrames, Messages: p.Messages,
		Abandoned: p.Abandoned, Events: s.events, UnknownEvents: s.unknown, OverflowSamples: s.queue.Overflow()}
}

// LinkStats reports the bytes the parser discarded and how often it lost
// the frame boundary (drivers.LinkCounter).
func (s *Source) LinkStats() drivers.LinkStats {
	st := s.Stats()
	return drivers.LinkStats{DiscardedBytes: st.DiscardedBytes, Resyncs: st.Resyncs}
}

// StartCommands are the bytes Start sends for a channel count: ask for the
// firmware and hardware type (?:;) and the board type (b:;), set the
// channel count, start streaming.
func StartCommands(channels int) string {
	return "?:;b:;c:" + strconv.Itoa(channels) + ";start:;"
}

// StopCommand stops the stream.
const StopCommand = "h:;"

// Start tells the box the channel count and starts the stream. The box
// does not acknowledge commands; its messages (BRD, HWT, FWV) are logged
// when they arrive.
func (s *Source) Start() error {
	if s.started {
		return errors.New("spikerbox: already started")
	}
	s.started = true
	if s.latency.Hint != "" {
		s.log.Warn(s.latency.Hint)
	}
	_ = s.port.ResetInputBuffer()
	if err := s.port.SetReadTimeout(serialport.NoTimeout); err != nil {
		return fmt.Errorf("spikerbox %s: %w", s.cfg.Path, err)
	}
	if _, err := s.port.Write([]byte(StartCommands(s.nch))); err != nil {
		return fmt.Errorf("spikerbox %s: sending the start command: %v — is the box still plugged in?", s.cfg.Path, err)
	}
	s.readerDone = make(chan struct{})
	go s.reader()
	s.log.Info("streaming", zap.Int("channels", s.nch), zap.Float64("rate_hz", s.cfg.Rate))
	return nil
}

func (s *Source) reader() {
	defer close(s.readerDone)
	buf := make([]byte, 4096)
	for {
		n, err := s.port.Read(buf)
		if n > 0 && !s.queue.Stopped() {
			s.queue.Lock()
			s.parser.Feed(buf[:n], s.frameFn, s.msgFn)
			discarded, resyncs, lost := s.parser.Discarded, s.parser.Resyncs, s.parser.Skipped
			s.queue.Unlock()
			s.queue.Wake()
			if discarded != s.reportedDiscarded {
				if ok, more := s.discardLog.Allow(time.Now()); ok {
					s.log.Warn(fmt.Sprintf("%d bytes discarded while resynchronising (corrupt, cut or stray bytes from the box); the samples they held are a gap in sample numbers", discarded-s.reportedDiscarded),
						zap.Uint64("discarded_bytes_total", discarded), zap.Uint64("resyncs_total", resyncs),
						zap.Uint64("lost_samples_total", lost), zap.Int("more_not_logged", more))
					s.reportedDiscarded = discarded
				}
			}
		}
		if err != nil {
			if s.closing.Load() {
				return
			}
			s.queue.Fail(fmt.Errorf("spikerbox %s: device disconnected: %v — check the USB cable; ephysd reopens the device when it is back", s.cfg.Path, err))
			return
		}
	}
}

// onMessage logs what the box says (queue locked).
func (s *Source) onMessage(key, value []byte) {
	if string(key) == "EVNT" {
		if n, ok := eventNumber(value); ok && n < EventLines {
			s.events++
			return
		}
		s.unknown++
		if ok, _ := s.eventLog.Allow(time.Now()); ok {
			s.log.Warn("EVNT message with an event number outside 0–9 ignored", zap.ByteString("value", value))
		}
		return
	}
	s.log.Info("device message", zap.ByteString("key", key), zap.ByteString("value", value))
}

// onFrame scales a frame, makes its digital word and queues it (queue locked).
func (s *Source) onFrame(f *Frame) {
	w := s.digital(f.Events & (1<<EventLines - 1))
	if f.Skipped > 0 {
		s.gaps++
	}
	sn := s.next + int64(f.Skipped)
	s.next = sn + 1
	for c, v := range f.Values {
		s.row[c] = (float32(v) - s.centre) * s.scale
	}
	s.queue.Push(sn, s.row, w)
}

// digital returns the input word of the next sample given the lines whose
// events arrived before it.
func (s *Source) digital(rise uint64) uint64 {
	rise |= s.pending
	clash := rise & s.word // high at the previous sample: go low first
	s.pending = clash
	rise &^= clash
	for r := rise; r != 0; r &= r - 1 {
		s.remain[bits.TrailingZeros64(r)] = s.pulse
	}
	var w uint64
	for a := s.word | rise; a != 0; a &= a - 1 {
		l := bits.TrailingZeros64(a)
		if clash&(1<<l) != 0 {
			s.remain[l] = 0
			continue
		}
		if s.remain[l] > 0 {
			w |= 1 << l
			s.remain[l]--
		}
	}
	s.word = w
	return w
}

// ReadBlock waits for at least one sample and fills b with up to b.Cap()
// consecutive samples (a block ends early at a gap: damaged bytes, or
// samples dropped because ReadBlock fell behind). After Stop it returns io.EOF; after an unplug, the samples
// received before it and then the error.
func (s *Source) ReadBlock(b *pipeline.Block) error {
	if b.Channels != s.nch {
		return fmt.Errorf("spikerbox: block has %d channels, the source has %d", b.Channels, s.nch)
	}
	if !s.started {
		return errors.New("spikerbox: ReadBlock before Start")
	}
	return s.queue.ReadBlock(b)
}

// Stop makes a pending ReadBlock, and every later one, return io.EOF, and
// tells the box to stop streaming (h:;).
func (s *Source) Stop() error {
	s.stopOnce.Do(func() {
		s.queue.Stop()
		if s.started {
			_, _ = s.port.Write([]byte(StopCommand))
		}
	})
	return nil
}

// Close stops the source and closes the serial device.
func (s *Source) Close() error {
	s.Stop()
	if s.closing.Swap(true) {
		return nil
	}
	err := s.port.Close()
	if s.readerDone != nil {
		<-s.readerDone
	}
	if err != nil {
		return fmt.Errorf("spikerbox %s: close: %w", s.cfg.Path, err)
	}
	return nil
}
