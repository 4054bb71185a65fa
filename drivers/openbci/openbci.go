package openbci

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"
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
	ProcessorName      = "OpenBCI Cyton"
	ProcessorNameDaisy = "OpenBCI Cyton Daisy"
	ProcessorID        = 100
	StreamName         = "cyton"
)

// channelChars are the channel characters of the channel-settings command:
// 1–8 on the Cyton, QWERTYUI for the Daisy's 9–16.
const channelChars = "12345678QWERTYUI"

// ringSlots is how many samples the source buffers between the reader and
// ReadBlock (32 s at 250 Hz).
const ringSlots = 8192

// Stats are the source's counters.
type Stats struct {
	DecoderStats
	// DiscardedBytes were dropped while resynchronising to packets.
	DiscardedBytes uint64
	// Resyncs is the number of stretches of discarded bytes: times the
	// parser lost the packet boundary and found it again.
	Resyncs uint64
	// OverflowSamples were dropped because ReadBlock was not called for
	// longer than the buffer holds (they show as a gap).
	OverflowSamples uint64
}

// Source is an OpenBCI Cyton (or Cyton + Daisy) behind its dongle. Make one
// with Config.Open or New. ReadBlock must be called from one goroutine;
// Stop may be called from any.
type Source struct {
	cfg     Config
	gains   []int
	info    pipeline.StreamInfo
	port    serialport.Port
	latency serialport.Latency
	log     *zap.Logger
	timeout time.Duration

	parser   Parser
	dec      *Decoder
	packetFn func(*Packet)
	sampleFn func(int64, []float32)

	// queue hands samples from the reader to ReadBlock; its lock also
	// guards the parser and the decoder.
	queue *drivers.SampleQueue
	nv    int // values per sample

	stopOnce   sync.Once
	closing    atomic.Bool
	started    bool
	readerDone chan struct{}

	lossLog, discardLog pipeline.LogLimiter
	reported            Stats // what the logs have reported
}

// New opens the serial device of a configuration that has passed Validate.
func New(cfg Config) (*Source, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	port, lat, err := serialport.Open(cfg.Path, serialport.Options{Baud: cfg.Baud})
	if err != nil {
		return nil, fmt.Errorf("openbci: %w", err)
	}
	s := &Source{
		cfg:     cfg,
		gains:   cfg.gains(),
		port:    port,
		latency: lat,
		log:     zap.NewNop(),
		timeout: time.Duration(cfg.TimeoutMS) * time.Millisecond,
	}
	s.dec = NewDecoder(cfg.Daisy, cfg.Accelerometer, s.gains)
	s.nv = s.dec.Channels()
	s.queue = drivers.NewSampleQueue(s.nv, ringSlots)
	s.packetFn = s.onPacket
	s.sampleFn = s.onSample
	s.info = s.makeInfo()
	return s, nil
}

// SetLogger sets where the source logs the board's banner, lost packets and
// resynchronisations (rate-limited). Call it before Start; the default
// discards logs.
func (s *Source) SetLogger(l *zap.Logger) {
	if l == nil {
		l = zap.NewNop()
	}
	s.log = l.With(zap.String("source", "openbci"), zap.String("path", s.cfg.Path))
}

func (s *Source) makeInfo() pipeline.StreamInfo {
	info := pipeline.StreamInfo{
		ProcessorName: ProcessorName,
		ProcessorID:   ProcessorID,
		StreamName:    StreamName,
		SampleRate:    s.cfg.SampleRate(),
	}
	if s.cfg.Daisy {
		info.ProcessorName = ProcessorNameDaisy
	}
	for c, g := range s.gains {
		board := "Cyton"
		if c >= 8 {
			board = "Daisy"
		}
		info.Channels = append(info.Channels, pipeline.ChannelInfo{
			Name:        "CH" + strconv.Itoa(c+1),
			Units:       "uV",
			BitVolts:    MicrovoltsPerCount(g) * BitVoltsCounts,
			Description: fmt.Sprintf("OpenBCI %s EEG channel, ADS1299 gain %d", board, g),
		})
	}
	if s.cfg.Accelerometer {
		for _, n := range []string{"AX", "AY", "AZ"} {
			info.Channels = append(info.Channels, pipeline.ChannelInfo{
				Name: n, Units: "g", BitVolts: AccelScale,
				Description: "OpenBCI Cyton accelerometer (LIS3DH), held between updates",
			})
		}
	}
	return info
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
	return Stats{DecoderStats: s.dec.Stats, DiscardedBytes: s.parser.Discarded, Resyncs: s.parser.Resyncs, OverflowSamples: s.queue.Overflow()}
}

// LinkStats reports the bytes the parser discarded and how often it lost
// the packet boundary (drivers.LinkCounter).
func (s *Source) LinkStats() drivers.LinkStats {
	st := s.Stats()
	return drivers.LinkStats{DiscardedBytes: st.DiscardedBytes, Resyncs: st.Resyncs}
}

// Start runs the start-up handshake — soft reset (v), default channel
// settings (d), the gain of every channel (x…X) — and starts streaming (b).
func (s *Source) Start() error {
	if s.started {
		return errors.New("openbci: already started")
	}
	s.started = true
	if s.latency.Hint != "" {
		s.log.Warn(s.latency.Hint)
	}
	_ = s.port.ResetInputBuffer()

	banner, err := s.command("v", "soft reset (v)", s.timeout)
	if err != nil {
		return err
	}
	s.log.Info("board reset", zap.String("banner", banner))
	hasDaisy := strings.Contains(banner, "Daisy")
	if s.cfg.Daisy && !hasDaisy {
		return fmt.Errorf("openbci %s: daisy = true but the board reports no Daisy module (banner %q): set daisy = false for 8 channels, or seat the Daisy and power-cycle the board", s.cfg.Path, banner)
	}
	if !s.cfg.Daisy && hasDaisy {
		return fmt.Errorf("openbci %s: the board has a Daisy module but daisy = false: set daisy = true in [source.openbci] (16 channels at 125 Hz)", s.cfg.Path)
	}

	if _, err := s.command("d", "default channel settings (d)", s.timeout); err != nil {
		return err
	}

	replies := true
	for c, g := range s.gains {
		cmd := fmt.Sprintf("x%c0%d0110X", channelChars[c], gainCode(g))
		if !replies {
			if err := s.write(cmd); err != nil {
				return err
			}
			time.Sleep(20 * time.Millisecond)
			continue
		}
		wait := min(s.timeout, time.Second)
		if _, err := s.command(cmd, "channel setting "+cmd, wait); err != nil {
			var nr *noReplyError
			if c == 0 && errors.As(err, &nr) && !nr.gotBytes {
				// Firmware before v3 does not answer channel settings.
				s.log.Info("the board does not confirm channel settings (firmware before v3); sending them without waiting")
				replies = false
				continue
			}
			return err
		}
	}

	_ = s.port.ResetInputBuffer()
	if err := s.port.SetReadTimeout(serialport.NoTimeout); err != nil {
		return fmt.Errorf("openbci %s: %w", s.cfg.Path, err)
	}
	if err := s.write("b"); err != nil {
		return err
	}
	s.readerDone = make(chan struct{})
	go s.reader()
	s.log.Info("streaming", zap.Int("channels", len(s.info.Channels)), zap.Float64("rate_hz", s.info.SampleRate), zap.Ints("gain", s.gains))
	return nil
}

// noReplyError is a handshake step that got no complete reply in time.
type noReplyError struct {
	msg      string
	gotBytes bool
}

func (e *noReplyError) Error() string { return e.msg }

func (s *Source) write(cmd string) error {
	if _, err := s.port.Write([]byte(cmd)); err != nil {
		return fmt.Errorf("openbci %s: sending %q: %v — is the dongle still plugged in?", s.cfg.Path, cmd, err)
	}
	return nil
}

// command sends cmd and waits up to timeout for a reply ending in "$$$".
// It returns the reply's printable text.
func (s *Source) command(cmd, what string, timeout time.Duration) (string, error) {
	if err := s.write(cmd); err != nil {
		return "", err
	}
	var acc []byte
	buf := make([]byte, 512)
	deadline := time.Now().Add(timeout)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			break
		}
		if err := s.port.SetReadTimeout(min(left, 50*time.Millisecond)); err != nil {
			return "", fmt.Errorf("openbci %s: %w", s.cfg.Path, err)
		}
		n, err := s.port.Read(buf)
		acc = append(acc, buf[:n]...)
		if err != nil {
			return "", fmt.Errorf("openbci %s: device disconnected during %s: %v — check the dongle's USB connection", s.cfg.Path, what, err)
		}
		if i := bytes.Index(acc, []byte("$$$")); i >= 0 {
			reply := printable(acc[:i])
			if strings.Contains(reply, "Failure") {
				return reply, fmt.Errorf("openbci %s: the dongle answered %q to %s — the board is off or not paired with the dongle: switch the board on (PC position), keep it near the dongle, and if it persists re-pair them (OpenBCI GUI: Autoscan)", s.cfg.Path, reply, what)
			}
			return reply, nil
		}
	}
	if cmd == "v" {
		return "", &noReplyError{gotBytes: len(acc) > 0, msg: fmt.Sprintf("openbci %s: no reply to soft reset (v) within %s s — is the board switched on (PC position) and the dongle's switch on GPIO6?%s", s.cfg.Path, seconds(timeout), partial(acc))}
	}
	return "", &noReplyError{gotBytes: len(acc) > 0, msg: fmt.Sprintf("openbci %s: no reply to %s within %s s — is the board still on? Power-cycle it and try again%s", s.cfg.Path, what, seconds(timeout), partial(acc))}
}

func seconds(d time.Duration) string { return strconv.FormatFloat(d.Seconds(), 'g', -1, 64) }

func partial(acc []byte) string {
	if len(acc) == 0 {
		return ""
	}
	return fmt.Sprintf(" (got %d bytes without the closing $$$: %q)", len(acc), printable(acc))
}

// printable keeps the text of a reply: printable ASCII, lines joined by " | ".
func printable(b []byte) string {
	var sb strings.Builder
	for _, line := range strings.Split(string(b), "\n") {
		t := strings.Map(func(r rune) rune {
			if r >= ' ' && r < 0x7f {
				return r
			}
			return -1
		}, line)
		if t = strings.TrimSpace(t); t == "" {
			continue
		}
		if sb.Len() > 0 {
			sb.WriteString(" | ")
		}
		sb.WriteString(t)
	}
	return sb.String()
}

// reader moves bytes from the port through the parser and decoder into the
// ring until the port fails or is closed.
func (s *Source) reader() {
	defer close(s.readerDone)
	buf := make([]byte, 4096)
	for {
		n, err := s.port.Read(buf)
		if n > 0 && !s.queue.Stopped() {
			s.queue.Lock()
			s.parser.Feed(buf[:n], s.packetFn)
			st := s.statsLocked()
			s.queue.Unlock()
			s.queue.Wake()
			s.logLosses(st)
		}
		if err != nil {
			if s.closing.Load() {
				return
			}
			s.queue.Fail(fmt.Errorf("openbci %s: device disconnected: %v — check the dongle's USB connection; ephysd reopens the device when it is back", s.cfg.Path, err))
			return
		}
	}
}

func (s *Source) onPacket(p *Packet) { s.dec.Add(p, s.sampleFn) }

func (s *Source) onSample(sn int64, v []float32) { s.queue.Push(sn, v, 0) }

// logLosses logs new lost packets and discarded bytes, rate-limited.
func (s *Source) logLosses(st Stats) {
	now := time.Now()
	if st.LostSamples+st.OverflowSamples != s.reported.LostSamples+s.reported.OverflowSamples || st.HalfPairs != s.reported.HalfPairs {
		if ok, more := s.lossLog.Allow(now); ok {
			s.log.Warn("packets lost between the board and the dongle (recorded as a gap in sample numbers) — move the board closer to the dongle, away from other 2.4 GHz radios",
				zap.Uint64("lost_packets_total", st.LostPackets), zap.Uint64("lost_samples_total", st.LostSamples),
				zap.Uint64("daisy_half_pairs_total", st.HalfPairs), zap.Uint64("overflow_samples_total", st.OverflowSamples),
				zap.Int("more_not_logged", more))
			s.reported.LostSamples, s.reported.OverflowSamples, s.reported.HalfPairs = st.LostSamples, st.OverflowSamples, st.HalfPairs
		}
	}
	if st.DiscardedBytes != s.reported.DiscardedBytes {
		if ok, more := s.discardLog.Allow(now); ok {
			s.log.Warn("bytes discarded while resynchronising to packets (corrupt or partial packets from the dongle)",
				zap.Uint64("discarded_bytes", st.DiscardedBytes-s.reported.DiscardedBytes),
				zap.Uint64("discarded_bytes_total", st.DiscardedBytes), zap.Uint64("resyncs_total", st.Resyncs), zap.Int("more_not_logged", more))
			s.reported.DiscardedBytes = st.DiscardedBytes
		}
	}
}

// ReadBlock waits for at least one sample and fills b with up to b.Cap()
// consecutive samples; it ends the block early at a gap (lost packets), so
// the next block starts at the later sample number. After Stop it returns
// io.EOF; after an unplug, the samples received before it and then the
// error.
func (s *Source) ReadBlock(b *pipeline.Block) error {
	if b.Channels != s.nv {
		return fmt.Errorf("openbci: block has %d channels, the source has %d", b.Channels, s.nv)
	}
	if !s.started {
		return errors.New("openbci: ReadBlock before Start")
	}
	return s.queue.ReadBlock(b)
}

// Stop makes a pending ReadBlock, and every later one, return io.EOF, and
// tells the board to stop streaming (s).
func (s *Source) Stop() error {
	s.stopOnce.Do(func() {
		s.queue.Stop()
		if s.started {
			_, _ = s.port.Write([]byte("s"))
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
		return fmt.Errorf("openbci %s: close: %w", s.cfg.Path, err)
	}
	return nil
}
