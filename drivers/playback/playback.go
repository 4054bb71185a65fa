// Package playback replays a recording in the Open Ephys binary format —
// made by the Open Ephys GUI (0.6 and later, and the older layout with
// int64 timestamps.npy) or by ephysd — as a source: one continuous stream
// with its TTL inputs, paced to the wall clock or as fast as possible.
//
// It registers itself as the source driver "playback", configured by the
// [source.playback] table:
//
//	[source.playback]
//	path = "/data/2024-05-01_10-00-00/Record Node 101/experiment1/recording1"
//	stream = ""       # folder or stream name; default: the first stream
//	realtime = true   # false: as fast as possible
//
// Samples keep their recorded sample numbers: a gap in the recording is a
// gap in the blocks (a block ends before it, the next starts after it).
package playback

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"math/bits"
	"os"
	"path/filepath"
	"sort"
	"unsafe"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/pipeline"
)

// Config is the [source.playback] table of the configuration file.
type Config struct {
	// Path is a recording folder (…/experimentN/recordingM), or a Record
	// Node or session folder that holds exactly one recording.
	Path string `toml:"path"`
	// Stream picks the continuous stream by folder name
	// ("Acquisition_Board-100.Rhythm_Data") or stream name ("Rhythm_Data").
	// Empty picks the first stream of structure.oebin.
	Stream string `toml:"stream"`
	// Realtime paces blocks to the wall clock at the recording's sample
	// rate; false delivers them as fast as they are read.
	Realtime bool `toml:"realtime"`
}

// DefaultConfig returns the configuration used for keys the file leaves out.
func DefaultConfig() Config { return Config{Realtime: true} }

func init() {
	drivers.RegisterSource("playback", func() drivers.SourceConfig { c := DefaultConfig(); return &c })
}

// ResolvePaths makes a relative Path relative to base (the folder of the
// configuration file).
func (c *Config) ResolvePaths(base string) {
	if c.Path != "" && !filepath.IsAbs(c.Path) {
		c.Path = filepath.Join(base, c.Path)
	}
}

// Open validates the configuration and opens the recording.
func (c *Config) Open() (drivers.Source, error) {
	s, err := Open(*c)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// Source replays one continuous stream of a recording. ReadBlock must be
// called from one goroutine; Stop may be called from any. Close must not be
// called while a ReadBlock is running.
type Source struct {
	dir      string // the recording folder
	info     pipeline.StreamInfo
	nch      int
	bitVolts []float64
	rate     float64
	realtime bool

	dat   []byte  // continuous.dat, mapped
	raw   []int16 // dat as interleaved samples
	sn    *npyArray
	sn64  bool // sample numbers are '<i8' (fast path)
	total int  // samples to play
	pos   int  // index of the next sample
	sn0   int64

	events []ttlEvent
	ei     int    // next event to apply
	word   uint64 // digital word after the applied events

	clock *drivers.Clock
}

// ttlEvent is one change of one input line.
type ttlEvent struct {
	sample int64
	line   uint8
	high   bool
}

// Open finds the recording that cfg.Path names, reads its structure.oebin
// and maps the chosen stream's files.
func Open(cfg Config) (*Source, error) {
	if cfg.Path == "" {
		return nil, errors.New("playback: path is not set — set [source.playback] path to a recording folder (…/experiment1/recording1)")
	}
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		return nil, errors.New("playback: continuous.dat is little-endian and this CPU is not; playback is not supported here")
	}
	dir, err := findRecording(cfg.Path)
	if err != nil {
		return nil, err
	}
	oebinPath := filepath.Join(dir, "structure.oebin")
	o, err := readOebin(oebinPath)
	if err != nil {
		return nil, err
	}
	st, err := o.pickStream(oebinPath, cfg.Stream)
	if err != nil {
		return nil, err
	}
	s := &Source{dir: dir, realtime: cfg.Realtime, clock: drivers.NewClock(1)}
	if err := s.describe(oebinPath, st); err != nil {
		return nil, err
	}
	s.clock = drivers.NewClock(s.rate)
	newer, known := o.guiVersionAtLeast06()
	if err := s.openContinuous(filepath.Join(dir, "continuous", folder(st.FolderName)), o.GUIVersion, newer, known); err != nil {
		s.Close()
		return nil, err
	}
	if err := s.openEvents(dir, o, st, newer, known); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// describe fills the stream description from the oebin entry.
func (s *Source) describe(oebinPath string, st *oebinContinuous) error {
	name := folder(st.FolderName)
	if !(st.SampleRate > 0) || math.IsInf(st.SampleRate, 0) {
		return fmt.Errorf("playback: %s: stream %s has sample_rate %v; it must be positive", oebinPath, name, st.SampleRate)
	}
	if len(st.Channels) == 0 {
		return fmt.Errorf("playback: %s: stream %s has no channels", oebinPath, name)
	}
	if st.NumChannels != 0 && int(st.NumChannels) != len(st.Channels) {
		return fmt.Errorf("playback: %s: stream %s says num_channels %d but lists %d channels", oebinPath, name, st.NumChannels, len(st.Channels))
	}
	streamName := st.StreamName
	if streamName == "" { // GUI < 0.6: "<Source>-<id>.<sub index>"
		if i := lastDot(name); i >= 0 {
			streamName = name[i+1:]
		}
	}
	s.nch = len(st.Channels)
	s.rate = st.SampleRate
	s.bitVolts = make([]float64, s.nch)
	s.info = pipeline.StreamInfo{
		ProcessorName: st.SourceProcessorName,
		ProcessorID:   int(st.SourceProcessorID),
		StreamName:    streamName,
		SampleRate:    st.SampleRate,
		Channels:      make([]pipeline.ChannelInfo, s.nch),
	}
	for i, ch := range st.Channels {
		if !(ch.BitVolts > 0) || math.IsInf(ch.BitVolts, 0) {
			return fmt.Errorf("playback: %s: stream %s: channel %d (%s) has bit_volts %v; it must be positive", oebinPath, name, i+1, ch.ChannelName, ch.BitVolts)
		}
		s.bitVolts[i] = ch.BitVolts
		s.info.Channels[i] = pipeline.ChannelInfo{
			Name:        ch.ChannelName,
			Units:       ch.Units,
			BitVolts:    ch.BitVolts,
			Description: ch.Description,
		}
	}
	return nil
}

func lastDot(s string) int {
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == '.' {
			return i
		}
	}
	return -1
}

// pickFile returns the first of names present in dir: the GUI ≥ 0.6 name
// when the version says so, the older name when it says older, either when
// the version is unknown.
func pickFile(dir, newName, oldName string, newer, known bool) string {
	switch {
	case known && newer:
		return filepath.Join(dir, newName)
	case known:
		return filepath.Join(dir, oldName)
	}
	if _, err := os.Stat(filepath.Join(dir, newName)); err == nil {
		return filepath.Join(dir, newName)
	}
	return filepath.Join(dir, oldName)
}

func missing(path, guiVersion string) error {
	return fmt.Errorf("playback: %s is missing (structure.oebin has GUI version %q, whose recordings keep sample numbers there); is the recording complete?", path, guiVersion)
}

// openContinuous maps continuous.dat and the sample numbers.
func (s *Source) openContinuous(dir, guiVersion string, newer, known bool) error {
	snPath := pickFile(dir, "sample_numbers.npy", "timestamps.npy", newer, known)
	sn, err := openNpy(snPath, true)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return missing(snPath, guiVersion)
		}
		return fmt.Errorf("playback: %w", err)
	}
	s.sn = sn
	if !sn.isInt() {
		return fmt.Errorf("playback: %s holds %s values, not integer sample numbers: this layout (GUI version %q) is not supported", snPath, sn.descr, guiVersion)
	}
	s.sn64 = sn.descr == "<i8"

	datPath := filepath.Join(dir, "continuous.dat")
	dat, err := mapFile(datPath)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("playback: %s is missing; is the recording complete?", datPath)
		}
		return fmt.Errorf("playback: %w", err)
	}
	s.dat = dat
	frames := len(dat) / (2 * s.nch)
	if frames > 0 {
		s.raw = unsafe.Slice((*int16)(unsafe.Pointer(&dat[0])), frames*s.nch)
	}
	// A recording cut short by a crash may hold a few more samples in one
	// file than in the other: play those both have.
	s.total = min(frames, sn.count)
	if s.total > 0 {
		s.sn0 = s.sampleNumber(0)
	}
	return nil
}

// openEvents reads the stream's TTL events.
func (s *Source) openEvents(dir string, o *oebin, st *oebinContinuous, newer, known bool) error {
	var lines uint64 // bit n set when line n is used
	for i, e := range o.ttlEvents(st) {
		if i == 0 {
			s.info.TTLChannelName = e.ChannelName
		}
		s.word |= uint64(e.InitialState)
		lines |= uint64(e.InitialState)
		evDir := filepath.Join(dir, "events", folder(e.FolderName))
		if _, err := os.Stat(evDir); errors.Is(err, fs.ErrNotExist) {
			continue // an event channel that never had an event
		}
		statesPath := pickFile(evDir, "states.npy", "channel_states.npy", newer, known)
		samplesPath := pickFile(evDir, "sample_numbers.npy", "timestamps.npy", newer, known)
		states, err := readInts(statesPath, o.GUIVersion)
		if err != nil {
			return err
		}
		samples, err := readInts(samplesPath, o.GUIVersion)
		if err != nil {
			return err
		}
		for k := range min(len(states), len(samples)) {
			v := states[k]
			if v == 0 || v > 64 || v < -64 {
				return fmt.Errorf("playback: %s: event %d has state %d; TTL states are ±(line+1), line 0–63", statesPath, k, v)
			}
			line := uint8(max(v, -v) - 1)
			lines |= 1 << line
			s.events = append(s.events, ttlEvent{sample: samples[k], line: line, high: v > 0})
		}
	}
	sort.SliceStable(s.events, func(i, j int) bool { return s.events[i].sample < s.events[j].sample })
	s.info.TTLLines = bits.Len64(lines)
	return nil
}

func readInts(path, guiVersion string) ([]int64, error) {
	a, err := openNpy(path, false)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("playback: %s is missing (structure.oebin has GUI version %q); is the recording complete?", path, guiVersion)
		}
		return nil, fmt.Errorf("playback: %w", err)
	}
	v, err := a.ints()
	if err != nil {
		return nil, fmt.Errorf("playback: %w", err)
	}
	return v, nil
}

// Dir is the recording folder being played.
func (s *Source) Dir() string { return s.dir }

// Samples is the number of samples the recording holds for the stream.
func (s *Source) Samples() int { return s.total }

// Info describes the stream as the recording does.
func (s *Source) Info() pipeline.StreamInfo { return s.info }

// Realtime reports whether blocks are paced to the wall clock
// (drivers.Paced): when false the pipeline may make the source wait
// instead of dropping blocks.
func (s *Source) Realtime() bool { return s.realtime }

// Start starts the clock that realtime pacing follows.
func (s *Source) Start() error {
	if err := s.clock.Start(); err != nil {
		return fmt.Errorf("playback: %w", err)
	}
	return nil
}

// Stop makes a pending ReadBlock, and every later one, return io.EOF.
func (s *Source) Stop() error {
	s.clock.Stop()
	return nil
}

// Close stops the source and unmaps the recording's files.
func (s *Source) Close() error {
	s.Stop()
	if s.dat != nil {
		if err := unmap(s.dat); err != nil {
			return fmt.Errorf("playback: %s: %w", s.dir, err)
		}
		s.dat, s.raw = nil, nil
	}
	s.sn.close()
	return nil
}

// sampleNumber is the sample number of sample i of the recording.
func (s *Source) sampleNumber(i int) int64 {
	if s.sn64 {
		return int64(binary.LittleEndian.Uint64(s.sn.data[i*8:]))
	}
	return s.sn.int64At(i)
}

// ReadBlock fills b with the next samples: b.Cap() of them, or fewer at the
// end of the recording and before a gap in its sample numbers. In realtime
// mode it returns when the wall clock, measured from Start, reaches the end
// of the block. It returns io.EOF at the end and after Stop.
func (s *Source) ReadBlock(b *pipeline.Block) error {
	if s.clock.Stopped() {
		return io.EOF
	}
	if !s.clock.Started() {
		return errors.New("playback: ReadBlock before Start")
	}
	if b.Channels != s.nch {
		return fmt.Errorf("playback: block has %d channels, the stream has %d", b.Channels, s.nch)
	}
	if s.pos >= s.total {
		return io.EOF
	}
	first := s.sampleNumber(s.pos)
	limit := min(b.Cap(), s.total-s.pos)
	n := 1
	for n < limit && s.sampleNumber(s.pos+n) == first+int64(n) {
		n++
	}
	b.Samples = n
	b.FirstSample = first
	s.convert(b.Data[:s.nch*n], n)
	s.digital(b.Digital[:n], first)
	s.pos += n
	if s.realtime {
		return s.clock.WaitUntil(first + int64(n) - s.sn0)
	}
	return nil
}

// convert writes n samples from s.pos, channel-major, in each channel's
// units. It writes four channels at a time, each sequentially, reading
// their columns of the interleaved block (which stays in cache): the other
// way round, every sample would write to as many places a power of two
// apart as there are channels, and miss the cache.
func (s *Source) convert(data []float32, n int) {
	nch := s.nch
	rows := s.raw[s.pos*nch : (s.pos+n)*nch]
	c := 0
	for ; c+4 <= nch; c += 4 {
		d0 := data[c*n : c*n+n]
		d1 := data[(c+1)*n : (c+1)*n+n][:len(d0)]
		d2 := data[(c+2)*n : (c+2)*n+n][:len(d0)]
		d3 := data[(c+3)*n : (c+3)*n+n][:len(d0)]
		bv := s.bitVolts[c : c+4 : c+4]
		for i, k := 0, c; i < len(d0); i, k = i+1, k+nch {
			r := rows[k : k+4 : k+4]
			d0[i] = float32(float64(r[0]) * bv[0])
			d1[i] = float32(float64(r[1]) * bv[1])
			d2[i] = float32(float64(r[2]) * bv[2])
			d3[i] = float32(float64(r[3]) * bv[3])
		}
	}
	for ; c < nch; c++ {
		dst := data[c*n : c*n+n]
		bv := s.bitVolts[c]
		for i, k := 0, c; i < len(dst); i, k = i+1, k+nch {
			dst[i] = float32(float64(rows[k]) * bv)
		}
	}
}

// digital fills the words of n samples from sample number first: the
// state after every event at or before each sample.
func (s *Source) digital(words []uint64, first int64) {
	ev := s.events
	for i := range words {
		sn := first + int64(i)
		for s.ei < len(ev) && ev[s.ei].sample <= sn {
			e := ev[s.ei]
			if e.high {
				s.word |= 1 << e.line
			} else {
				s.word &^= 1 << e.line
			}
			s.ei++
		}
		words[i] = s.word
	}
}
