// Package recording writes what the pipeline produces to disk in the Open
// Ephys binary format, and decides (Session) where recordings go and how they
// are numbered.
//
// A Recorder is a pipeline.Consumer. It writes continuous.dat and the .npy
// files through buffers that reach the disk in whole records, and at least
// once per checkpoint interval it flushes everything and rewrites the record
// counts in the .npy headers in place, so that a killed daemon leaves a
// recording that neo, open-ephys-python-tools and numpy open, holding every
// sample up to the last checkpoint.
package recording

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/pipeline"
)

// DefaultCheckpointInterval is how often, at most, buffered data and .npy
// headers reach the disk when Config.CheckpointInterval is 0.
const DefaultCheckpointInterval = time.Second

// datBufferBytes is about the size of the continuous.dat buffer of a stream.
const datBufferBytes = 1 << 20

// EventChannel is a TTL event channel made by a processing stage (a Python
// stage's add_python_event): its events are the TTL events whose Processor
// is ProcessorID.
type EventChannel struct {
	ProcessorID   int
	ProcessorName string // e.g. "Python Processor"
	ChannelName   string // e.g. "Python Processor Output"; "" means ProcessorName + " Output"
}

// Config describes what a Recorder records.
type Config struct {
	// Stream is the source's continuous stream. Its TTL events (Processor ==
	// Stream.ProcessorID) go to its TTL channel.
	Stream pipeline.StreamInfo
	// RecordNodeID names the record node folder ("Record Node 101"); 0 means
	// DefaultRecordNodeID.
	RecordNodeID int
	// RecordRaw also records each block's Raw copy (the samples before the
	// stages ran) as a second continuous stream, <stream>_raw. The runner
	// must then keep raw copies (pipeline.RunnerConfig.KeepRaw).
	RecordRaw bool
	// EventChannels are the TTL event channels of processing stages.
	EventChannels []EventChannel
	// SpikeSources describe the processors that make spikes and their
	// electrodes (spikes.go). Spikes of an EventChannels processor (a
	// Python stage's add_python_spike) are recorded without one.
	SpikeSources []SpikeSource
	// Log receives warnings (NaN samples, events of unknown processors) and
	// background write errors; nil means no logging.
	Log *zap.Logger
	// CheckpointInterval is how long data may stay buffered before it and
	// the .npy headers are written; 0 means DefaultCheckpointInterval. It
	// bounds what a killed or crashed process loses (see Recover).
	CheckpointInterval time.Duration
	// Fsync is when the data reaches the disk itself rather than the
	// kernel's cache, which bounds what a power cut loses: FsyncClose ("",
	// the default) when a recording is finalised, FsyncCheckpoint at every
	// checkpoint as well.
	Fsync FsyncPolicy
	// OnError, if set, makes a write error (a full disk) stop only the
	// recording it happened in: the recorder closes that recording's
	// files, makes them consistent (Recover, in the background), calls
	// OnError (never with the recorder's lock held), drops the rest of
	// that recording's blocks, and records the next recording (another
	// Block.Recording) afresh; Consume returns nil. With OnError nil the
	// first error is returned by Consume and every later call, and the
	// pipeline runner stops.
	OnError func(rec pipeline.Recording, err error)
	// OpenFile, if set, opens the files samples and events are written to
	// (continuous.dat and the .npy files) instead of os.OpenFile: tests
	// put a fault-injecting disk there.
	OpenFile func(name string, flag int, perm os.FileMode) (File, error)
	// GUIVersion is the "GUI version" of structure.oebin; "" means
	// DefaultGUIVersion.
	GUIVersion string
}

// FsyncPolicy is when a Recorder syncs its files to the disk.
type FsyncPolicy string

// The fsync policies.
const (
	// FsyncClose syncs the files when a recording is finalised (and
	// structure.oebin and text.npy whenever they are written): a power cut
	// may lose what the kernel had not yet written back (up to about 30 s
	// with Linux's default dirty_expire_centisecs).
	FsyncClose FsyncPolicy = "close"
	// FsyncCheckpoint also syncs every file at each checkpoint, before the
	// .npy headers are rewritten: a power cut loses at most the data since
	// the last checkpoint.
	FsyncCheckpoint FsyncPolicy = "checkpoint"
)

// File is what a Recorder needs of a file it writes records to; *os.File
// has it.
type File interface {
	io.Writer
	io.WriterAt
	Seek(offset int64, whence int) (int64, error)
	Truncate(size int64) error
	Sync() error
	Close() error
}

// Stats are a Recorder's counters.
type Stats struct {
	Samples       uint64 // sample frames recorded (main stream)
	NaNSamples    uint64 // NaN values recorded as 0
	DroppedEvents uint64 // events of processors without an event channel
	Spikes        uint64 // spikes recorded
	DroppedSpikes uint64 // spikes of unknown processors, malformed, or past MaxSpikeElectrodes
	Checkpoints   uint64
	// Failures counts recordings stopped by a write error (with OnError).
	Failures uint64
	// LostSamples are the sample frames of blocks that belonged to a
	// recording after it failed, which were therefore not recorded.
	LostSamples uint64
}

// Recorder writes the blocks that belong to a recording (Block.Recording
// non-nil) in the Open Ephys binary format. A change of Block.Recording
// closes the open recording and opens the new one. Consume and End are
// called from one goroutine; a background ticker checkpoints a recording
// whose source has stalled.
type Recorder struct {
	cfg        Config
	log        *zap.Logger
	interval   time.Duration
	ttlFolders []string // events/<...>/TTL per TTL channel: 0 = source, then EventChannels
	ttlNames   []string
	ttlProcs   []string

	mu             sync.Mutex
	cur            pipeline.Recording
	rec            *openRecording
	lastCheckpoint time.Time
	dirty          bool
	err            error
	ended          bool
	stats          Stats
	// failed is the recording that stopped on a write error (with
	// OnError), whose remaining blocks are dropped; failing is set while
	// that is so.
	failed    pipeline.Recording
	failing   bool
	recovered sync.WaitGroup // background recoveries of failed recordings
	reports   []func()       // OnError calls to make once r.mu is released

	// checkpointTime is how long each checkpoint took (writing the buffers,
	// the .npy headers, text.npy and structure.oebin).
	checkpointTime pipeline.Histogram
	// bytes is the number of bytes in the files of this recorder's
	// recordings as of their last checkpoint (sample, timestamp and event
	// records and .npy headers; not structure.oebin, text.npy or
	// sync_messages.txt); bytesBase is its value when the open recording
	// was opened. Both are updated by checkpoints, about once a second.
	bytes     atomic.Uint64
	bytesBase uint64

	tickStop chan struct{}
	tickDone chan struct{}

	unknownLog, nanLog pipeline.LogLimiter
	spikeCfg           *recorderSpikes
}

// roundToEven rounds half to even like math.RoundToEven, faster where the
// CPU lacks (or Go does not assume) SSE4.1: adding and subtracting 1.5×2^52
// leaves the nearest integer under the default rounding mode. It is exact
// for |v| < 2^51; larger values, infinities and NaN come out large, infinite
// or NaN, which the caller clips or zeroes.
func roundToEven(v float64) float64 {
	const magic = 6755399441055744.0
	return (v + magic) - magic
}

// contStream is one continuous stream of an open recording.
type contStream struct {
	info   *pipeline.StreamInfo
	name   string // stream name as written
	folder string // <Source>-<id>.<name>
	bitVol []float64
	inv    []float64 // 1 / bitVol
	rate   float64
	dat    *recordFile
	sn, ts *recordFile
}

// ttlChannel is one TTL event channel of an open recording.
type ttlChannel struct {
	states, sn, ts, words *recordFile
	listed                bool // in the structure.oebin on disk
}

// messageChannel is the MessageCenter channel of an open recording.
type messageChannel struct {
	dir     string
	sn, ts  *recordFile
	texts   []string
	width   int
	written int // texts in the text.npy on disk
	listed  bool
}

// openRecording is the recording being written.
type openRecording struct {
	dir     string
	streams []*contStream
	ttl     []*ttlChannel
	msgs    *messageChannel
	spikes  *recordingSpikes // nil until the first spike
	oebin   bool             // structure.oebin written at least once
	all     []*recordFile
	// syncedFiles is the number of files whose folder entries were synced
	// (FsyncCheckpoint).
	syncedFiles int
}

// syncDirs syncs the folders of the recording's files and the recording
// folder's parents up to the session's parent, so that files created since
// the last checkpoint survive a power cut (FsyncCheckpoint).
func (o *openRecording) syncDirs() {
	seen := map[string]bool{}
	for _, f := range o.all {
		if f.f != nil {
			for d := filepath.Dir(f.path); len(d) > len(o.dir) && !seen[d]; d = filepath.Dir(d) {
				seen[d] = true
			}
		}
	}
	d := o.dir
	for i := 0; i < 5; i++ { // recording, experiment, Record Node, session, parent
		seen[d] = true
		d = filepath.Dir(d)
	}
	for d := range seen {
		syncDir(d)
	}
}

// NewRecorder checks cfg and returns a recorder. Nothing is written before
// the first block that belongs to a recording.
func NewRecorder(cfg Config) (*Recorder, error) {
	s := &cfg.Stream
	if err := checkName("processor name", s.ProcessorName, false); err != nil {
		return nil, err
	}
	if err := checkName("stream name", s.StreamName, true); err != nil {
		return nil, err
	}
	if !(s.SampleRate > 0) || math.IsInf(s.SampleRate, 0) {
		return nil, fmt.Errorf("recording: stream %s: sample rate %v Hz: must be a positive number", s.StreamName, s.SampleRate)
	}
	if len(s.Channels) == 0 {
		return nil, fmt.Errorf("recording: stream %s has no channels", s.StreamName)
	}
	for i, ch := range s.Channels {
		if !(ch.BitVolts > 0) || math.IsInf(ch.BitVolts, 0) {
			return nil, fmt.Errorf("recording: stream %s channel %d (%q): bit_volts %v: must be a positive number (0.195 for headstage channels in uV)", s.StreamName, i, ch.Name, ch.BitVolts)
		}
	}
	switch cfg.Fsync {
	case "", FsyncClose, FsyncCheckpoint:
	default:
		return nil, fmt.Errorf("recording: fsync policy %q: use %q or %q", cfg.Fsync, FsyncCheckpoint, FsyncClose)
	}
	if cfg.RecordNodeID == 0 {
		cfg.RecordNodeID = DefaultRecordNodeID
	}
	if cfg.CheckpointInterval <= 0 {
		cfg.CheckpointInterval = DefaultCheckpointInterval
	}
	if cfg.GUIVersion == "" {
		cfg.GUIVersion = DefaultGUIVersion
	}
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	r := &Recorder{cfg: cfg, log: cfg.Log, interval: cfg.CheckpointInterval}
	ttlName := s.TTLChannelName
	if ttlName == "" {
		ttlName = "TTL Input"
	}
	r.ttlFolders = append(r.ttlFolders, filepath.Join(sourceFolder(s.ProcessorName, s.ProcessorID, s.StreamName), "TTL"))
	r.ttlNames = append(r.ttlNames, ttlName)
	r.ttlProcs = append(r.ttlProcs, s.ProcessorName)
	seen := map[int]bool{s.ProcessorID: true}
	cfg.EventChannels = append([]EventChannel(nil), cfg.EventChannels...)
	for i := range cfg.EventChannels {
		ec := &cfg.EventChannels[i]
		if err := checkName("event channel processor name", ec.ProcessorName, false); err != nil {
			return nil, err
		}
		if seen[ec.ProcessorID] {
			return nil, fmt.Errorf("recording: event channel %q: processor id %d is used twice (the source and each event channel need their own id)", ec.ProcessorName, ec.ProcessorID)
		}
		seen[ec.ProcessorID] = true
		if ec.ChannelName == "" {
			ec.ChannelName = ec.ProcessorName + " Output"
		}
		r.ttlFolders = append(r.ttlFolders, filepath.Join(sourceFolder(ec.ProcessorName, ec.ProcessorID, s.StreamName), "TTL"))
		r.ttlNames = append(r.ttlNames, ec.ChannelName)
		r.ttlProcs = append(r.ttlProcs, ec.ProcessorName)
	}
	r.cfg = cfg
	r.unknownLog.Interval = 10 * time.Second
	r.nanLog.Interval = 10 * time.Second
	var err error
	if r.spikeCfg, err = newRecorderSpikes(&r.cfg); err != nil {
		return nil, err
	}
	return r, nil
}

// errEnded is returned by Consume after End.
var errEnded = errors.New("recording: Consume called after End")

// Consume records b if it belongs to a recording, first closing the open
// recording and opening b's when b.Recording changed. It returns the first
// write error, with the file it concerns (with Config.OnError set, it
// reports it there instead and returns nil).
func (r *Recorder) Consume(b *pipeline.Block) error {
	r.mu.Lock()
	err := r.consume(b)
	report := r.takeReports()
	r.mu.Unlock()
	for _, f := range report {
		f()
	}
	return err
}

func (r *Recorder) consume(b *pipeline.Block) error {
	if r.err != nil {
		return r.err
	}
	if r.ended {
		return errEnded
	}
	if b.Recording == nil {
		r.failing = false
		if r.rec != nil {
			if err := r.closeRecording(); err != nil {
				return r.failRecording(r.cur, err, 0)
			}
		}
		return nil
	}
	if r.failing {
		if *b.Recording == r.failed {
			r.stats.LostSamples += uint64(b.Samples)
			return nil
		}
		r.failing = false
	}
	if r.rec == nil || *b.Recording != r.cur {
		if r.rec != nil {
			if err := r.closeRecording(); err != nil {
				if err := r.failRecording(r.cur, err, 0); err != nil {
					return err
				}
			}
		}
		if err := r.openRecording(b); err != nil {
			return r.failRecording(*b.Recording, err, b.Samples)
		}
	}
	if err := r.write(b); err != nil {
		return r.failRecording(r.cur, err, b.Samples)
	}
	if time.Since(r.lastCheckpoint) >= r.interval {
		if err := r.checkpoint(); err != nil {
			return r.failRecording(r.cur, err, 0)
		}
	}
	return nil
}

// failRecording handles a write error in recording rec. Without
// Config.OnError it is the recorder's end (fail). With it, only rec
// stops: its files are closed and made consistent in the background, the
// rest of its blocks (from the one of lost samples) are dropped, and
// OnError is queued for the caller to call once the lock is released.
func (r *Recorder) failRecording(rec pipeline.Recording, err error, lost int) error {
	if r.cfg.OnError == nil {
		return r.fail(err)
	}
	err = explainWriteError(err)
	if r.rec != nil {
		r.rec.abandon()
		r.rec = nil
	}
	r.failed, r.failing = rec, true
	r.stats.Failures++
	r.stats.LostSamples += uint64(lost)
	dir := RecordingPath(&rec, r.cfg.RecordNodeID)
	r.log.Error("recording stopped by a write error; acquisition goes on", zap.String("recording", dir), zap.Error(err))
	r.recovered.Add(1)
	go func() {
		defer r.recovered.Done()
		rep, rerr := Recover(dir)
		switch {
		case rerr == nil && rep.Err() == nil:
			r.log.Info("the stopped recording was made consistent", zap.String("recording", dir), zap.String("changes", strings.TrimSpace(rep.String())))
		case rerr != nil:
			r.log.Error("the stopped recording could not be made consistent: run `ephysd recover` on it once the disk has room", zap.String("recording", dir), zap.Error(rerr))
		default:
			r.log.Error("the stopped recording could not be made consistent: run `ephysd recover` on it once the disk has room", zap.String("recording", dir), zap.Error(rep.Err()))
		}
	}()
	on := r.cfg.OnError
	r.reports = append(r.reports, func() { on(rec, err) })
	return nil
}

// takeReports returns the queued OnError calls (r.mu held).
func (r *Recorder) takeReports() []func() {
	if len(r.reports) == 0 {
		return nil
	}
	out := r.reports
	r.reports = nil
	return out
}

// explainWriteError adds what to do to a full disk's error.
func explainWriteError(err error) error {
	switch {
	case errors.Is(err, syscall.ENOSPC):
		return fmt.Errorf("%w (disk full: free space on the recording disk, then start a new recording; what was written so far is kept and made readable)", err)
	case errors.Is(err, syscall.EDQUOT):
		return fmt.Errorf("%w (disk quota exceeded: free space or raise the quota, then start a new recording; what was written so far is kept and made readable)", err)
	}
	return err
}

// End closes the open recording: it writes the buffered data, the final
// .npy headers and structure.oebin. Calling it again returns the same
// result.
func (r *Recorder) End() error {
	r.mu.Lock()
	if r.ended {
		err := r.err
		r.mu.Unlock()
		return err
	}
	r.ended = true
	var closeErr error
	if r.rec != nil {
		if closeErr = r.closeRecording(); closeErr != nil {
			if r.cfg.OnError != nil {
				_ = r.failRecording(r.cur, closeErr, 0)
			} else if r.err == nil {
				r.err = closeErr
			}
		}
	}
	stop, done := r.tickStop, r.tickDone
	err := r.err
	if err == nil {
		err = closeErr
	}
	report := r.takeReports()
	r.mu.Unlock()
	for _, f := range report {
		f()
	}
	if stop != nil {
		close(stop)
		<-done
	}
	r.recovered.Wait()
	return err
}

// Stats returns the recorder's counters.
func (r *Recorder) Stats() Stats {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.stats
}

// CheckpointTime is the histogram of the time each checkpoint took: writing
// everything buffered to the files, the .npy headers, and text.npy and
// structure.oebin when they changed (those two are synced to disk). A
// checkpoint runs about once per checkpoint interval and when a recording
// closes.
func (r *Recorder) CheckpointTime() *pipeline.Histogram { return &r.checkpointTime }

// BytesWritten is the number of bytes written to the recording files
// (continuous.dat, sample numbers, timestamps, events, with their .npy
// headers) of every recording this recorder made, as of their last
// checkpoint: it grows about once per checkpoint interval. It does not
// take the recorder's lock.
func (r *Recorder) BytesWritten() uint64 { return r.bytes.Load() }

// fail keeps the first error: after it the recorder writes nothing more.
func (r *Recorder) fail(err error) error {
	if err != nil && r.err == nil {
		r.err = err
		if r.rec != nil {
			r.rec.abandon()
			r.rec = nil
		}
	}
	return err
}

// openRecording creates the folders and files of b's recording.
func (r *Recorder) openRecording(b *pipeline.Block) error {
	rec := *b.Recording
	if rec.Dir == "" || rec.Experiment < 1 || rec.Number < 1 {
		return fmt.Errorf("recording: invalid recording %+v: it needs a folder and experiment and recording numbers from 1 (recording.Session makes them)", rec)
	}
	if r.cfg.RecordRaw && b.Raw == nil {
		return fmt.Errorf("recording: block at sample %d has no raw copy but RecordRaw is set: enable KeepRaw in the pipeline runner", b.FirstSample)
	}
	now := time.Now()
	node := recordNodePath(rec.Dir, r.cfg.RecordNodeID)
	dir := RecordingPath(&rec, r.cfg.RecordNodeID)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fileError("create recording folder", dir, err)
	}
	if sp := settingsPath(node, rec.Experiment); !fileExists(sp) {
		if err := writeFileAtomic(sp, settingsXML(r.cfg.GUIVersion, now, r.cfg.Stream)); err != nil {
			return err
		}
	}
	o := &openRecording{dir: dir}
	s := &r.cfg.Stream
	names := []string{s.StreamName}
	if r.cfg.RecordRaw {
		names = append(names, s.StreamName+"_raw")
	}
	for _, name := range names {
		cs, err := newContStream(dir, s, name, r.cfg.OpenFile)
		if err != nil {
			o.abandon()
			return err
		}
		o.streams = append(o.streams, cs)
	}
	// The stream files exist (each created anew, so the folder is this
	// recording's): mark the recording unfinished before any sample.
	if err := r.writeMarker(dir, now); err != nil {
		o.abandon()
		return err
	}
	evDir := filepath.Join(dir, "events")
	for _, folder := range r.ttlFolders {
		d := filepath.Join(evDir, folder)
		o.ttl = append(o.ttl, &ttlChannel{
			states: lazyNpy(d, "states.npy", "<i2", 2, r.cfg.OpenFile),
			sn:     lazyNpy(d, "sample_numbers.npy", "<i8", 8, r.cfg.OpenFile),
			ts:     lazyNpy(d, "timestamps.npy", "<f8", 8, r.cfg.OpenFile),
			words:  lazyNpy(d, "full_words.npy", "<u8", 8, r.cfg.OpenFile),
		})
	}
	md := filepath.Join(evDir, messageCenterFolder)
	o.msgs = &messageChannel{
		dir: md,
		sn:  lazyNpy(md, "sample_numbers.npy", "<i8", 8, r.cfg.OpenFile),
		ts:  lazyNpy(md, "timestamps.npy", "<f8", 8, r.cfg.OpenFile),
	}
	o.listFiles()
	syncPath := filepath.Join(dir, "sync_messages.txt")
	if err := writeFileAtomic(syncPath, syncMessages(now, o.streams, b.FirstSample)); err != nil {
		o.abandon()
		return err
	}
	r.rec = o
	r.cur = rec
	r.bytesBase = r.bytes.Load()
	r.lastCheckpoint = now
	r.dirty = false
	if r.tickStop == nil {
		r.tickStop = make(chan struct{})
		r.tickDone = make(chan struct{})
		go r.ticker(r.tickStop, r.tickDone)
	}
	return nil
}

func newContStream(dir string, s *pipeline.StreamInfo, name string, open func(string, int, os.FileMode) (File, error)) (*contStream, error) {
	cs := &contStream{
		info:   s,
		name:   name,
		folder: sourceFolder(s.ProcessorName, s.ProcessorID, name),
		rate:   s.SampleRate,
	}
	for _, ch := range s.Channels {
		cs.bitVol = append(cs.bitVol, ch.BitVolts)
		cs.inv = append(cs.inv, 1/ch.BitVolts)
	}
	d := filepath.Join(dir, "continuous", cs.folder)
	frame := 2 * len(s.Channels)
	frames := max(datBufferBytes/frame, 1)
	var err error
	if cs.dat, err = openRecordFile(filepath.Join(d, "continuous.dat"), "", frame, frames, open); err != nil {
		return nil, err
	}
	if cs.sn, err = openRecordFile(filepath.Join(d, "sample_numbers.npy"), "<i8", 8, frames, open); err != nil {
		cs.abandon()
		return nil, err
	}
	if cs.ts, err = openRecordFile(filepath.Join(d, "timestamps.npy"), "<f8", 8, frames, open); err != nil {
		cs.abandon()
		return nil, err
	}
	return cs, nil
}

// openRecordFile creates a record file at once through open (nil:
// os.OpenFile).
func openRecordFile(path, descr string, recordSize, bufRecords int, open func(string, int, os.FileMode) (File, error)) (*recordFile, error) {
	w, _ := newRecordFile(path, descr, recordSize, bufRecords, true) // lazy: cannot fail
	w.lazy, w.open = false, open
	if err := w.create(); err != nil {
		return nil, err
	}
	return w, nil
}

// lazyNpy prepares an event .npy file that is created at its first flush.
func lazyNpy(dir, name, descr string, size int, open func(string, int, os.FileMode) (File, error)) *recordFile {
	w, _ := newRecordFile(filepath.Join(dir, name), descr, size, 64, true) // lazy: cannot fail
	w.open = open
	return w
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// write appends b's samples and events to the open recording's buffers.
func (r *Recorder) write(b *pipeline.Block) error {
	o := r.rec
	if b.Channels != len(r.cfg.Stream.Channels) {
		return fmt.Errorf("recording: block at sample %d has %d channels, the stream %s has %d", b.FirstSample, b.Channels, r.cfg.Stream.StreamName, len(r.cfg.Stream.Channels))
	}
	if b.Samples <= 0 {
		return nil
	}
	nans, err := o.streams[0].write(b)
	if err != nil {
		return err
	}
	if len(o.streams) > 1 {
		raw := b.Raw
		if raw == nil {
			return fmt.Errorf("recording: block at sample %d has no raw copy but RecordRaw is set: enable KeepRaw in the pipeline runner", b.FirstSample)
		}
		if raw.Channels != b.Channels || raw.Samples != b.Samples || raw.FirstSample != b.FirstSample {
			return fmt.Errorf("recording: raw copy of the block at sample %d has %d×%d samples from %d, the block %d×%d",
				b.FirstSample, raw.Channels, raw.Samples, raw.FirstSample, b.Channels, b.Samples)
		}
		n, err := o.streams[1].write(raw)
		if err != nil {
			return err
		}
		nans += n
	}
	r.stats.Samples += uint64(b.Samples)
	if nans > 0 {
		r.stats.NaNSamples += uint64(nans)
		if ok, more := r.nanLog.Allow(time.Now()); ok {
			r.log.Warn("NaN samples recorded as 0", zap.Int64("block_first_sample", b.FirstSample),
				zap.Int("in_block", nans), zap.Int("more_blocks_not_logged", more))
		}
	}
	for i := range b.Events {
		if err := r.writeEvent(&b.Events[i]); err != nil {
			return err
		}
	}
	for i := range b.Spikes {
		if err := r.writeSpike(&b.Spikes[i]); err != nil {
			return err
		}
	}
	r.dirty = true
	return nil
}

// write converts a block to int16 frames and appends them, with their sample
// numbers and timestamps. It returns the number of NaN values.
func (s *contStream) write(b *pipeline.Block) (int, error) {
	n, nch := b.Samples, b.Channels
	dat, err := s.dat.next(n)
	if err != nil {
		return 0, err
	}
	nans := 0
	out := unsafe.Slice((*int16)(unsafe.Pointer(&dat[0])), n*nch) // little-endian hosts only (see endian.go)
	for c := 0; c < nch; c++ {
		bv, inv := s.bitVol[c], s.inv[c]
		for i, x := range b.Data[c*n : c*n+n] {
			// Multiplying by the reciprocal is much faster than dividing and
			// gives the same integer except within an ulp of a .5 tie, where
			// the division decides: the result is exactly numpy's
			// round(x / bit_volts).
			v := float64(x) * inv
			r := roundToEven(v)
			if math.Abs(v-r) > 0.5-1e-9 {
				v = float64(x) / bv
				r = roundToEven(v)
			}
			switch {
			case v != v:
				r = 0
				nans++
			case r > math.MaxInt16:
				r = math.MaxInt16
			case r < math.MinInt16:
				r = math.MinInt16
			}
			out[i*nch+c] = int16(r)
		}
	}
	sn, err := s.sn.next(n)
	if err != nil {
		return nans, err
	}
	ts, err := s.ts.next(n)
	if err != nil {
		return nans, err
	}
	for i := 0; i < n; i++ {
		k := b.FirstSample + int64(i)
		binary.LittleEndian.PutUint64(sn[8*i:], uint64(k))
		binary.LittleEndian.PutUint64(ts[8*i:], math.Float64bits(float64(k)/s.rate))
	}
	return nans, nil
}

// writeEvent appends one event to its channel, or drops it (logged, rate
// limited) when no channel records its processor.
func (r *Recorder) writeEvent(ev *pipeline.Event) error {
	o := r.rec
	rate := r.cfg.Stream.SampleRate
	switch ev.Kind {
	case pipeline.EventTTL:
		idx := -1
		if ev.Processor == r.cfg.Stream.ProcessorID {
			idx = 0
		} else {
			for i := range r.cfg.EventChannels {
				if r.cfg.EventChannels[i].ProcessorID == ev.Processor {
					idx = i + 1
					break
				}
			}
		}
		if idx < 0 {
			r.dropEvent(ev)
			return nil
		}
		t := o.ttl[idx]
		state := int16(ev.Line) + 1
		if !ev.State {
			state = -state
		}
		if err := putRecord(t.states, func(p []byte) { binary.LittleEndian.PutUint16(p, uint16(state)) }); err != nil {
			return err
		}
		if err := putRecord(t.sn, func(p []byte) { binary.LittleEndian.PutUint64(p, uint64(ev.SampleNumber)) }); err != nil {
			return err
		}
		if err := putRecord(t.ts, func(p []byte) { binary.LittleEndian.PutUint64(p, math.Float64bits(float64(ev.SampleNumber)/rate)) }); err != nil {
			return err
		}
		return putRecord(t.words, func(p []byte) { binary.LittleEndian.PutUint64(p, ev.FullWord) })
	case pipeline.EventMessage:
		m := o.msgs
		if err := putRecord(m.sn, func(p []byte) { binary.LittleEndian.PutUint64(p, uint64(ev.SampleNumber)) }); err != nil {
			return err
		}
		if err := putRecord(m.ts, func(p []byte) { binary.LittleEndian.PutUint64(p, math.Float64bits(float64(ev.SampleNumber)/rate)) }); err != nil {
			return err
		}
		m.texts = append(m.texts, ev.Text)
		m.width = max(m.width, len(ev.Text))
		return nil
	default:
		r.dropEvent(ev)
		return nil
	}
}

// putRecord appends one record to w, filled by fill.
func putRecord(w *recordFile, fill func([]byte)) error {
	p, err := w.next(1)
	if err != nil {
		return err
	}
	fill(p)
	return nil
}

func (r *Recorder) dropEvent(ev *pipeline.Event) {
	r.stats.DroppedEvents++
	if ok, more := r.unknownLog.Allow(time.Now()); ok {
		r.log.Warn("event dropped: no event channel records its processor (add it to recording.Config.EventChannels)",
			zap.Int("processor", ev.Processor), zap.Uint8("kind", uint8(ev.Kind)),
			zap.Int64("sample_number", ev.SampleNumber), zap.Int("more_not_logged", more))
	}
}

// checkpoint writes everything buffered, then the .npy headers, then the
// message texts and structure.oebin when they changed: a header never
// claims more records than its file holds, and the sample numbers and
// timestamps of each stream agree with its continuous.dat.
func (r *Recorder) checkpoint() error {
	o := r.rec
	start := time.Now()
	r.lastCheckpoint = start
	r.dirty = false
	r.stats.Checkpoints++
	defer func() {
		r.checkpointTime.Record(time.Since(start))
		r.bytes.Store(r.bytesBase + o.bytesOnDisk())
	}()
	for _, f := range o.all {
		if err := f.flush(); err != nil {
			return err
		}
	}
	if r.cfg.Fsync == FsyncCheckpoint {
		// The data reaches the disk before the headers claim it.
		open := 0
		for _, f := range o.all {
			if f.f != nil {
				open++
			}
			if err := f.sync(); err != nil {
				return err
			}
		}
		if open != o.syncedFiles {
			o.syncDirs()
			o.syncedFiles = open
		}
	}
	for _, f := range o.all {
		if err := f.writeHeader(); err != nil {
			return err
		}
	}
	if err := o.msgs.writeText(); err != nil {
		return err
	}
	return o.writeOebin(r, false)
}

// bytesOnDisk is the size of o's record files as written so far.
func (o *openRecording) bytesOnDisk() uint64 {
	var n uint64
	for _, f := range o.all {
		if f.f != nil {
			n += uint64(f.headerSize) + uint64(f.onDisk)*uint64(f.recordSize)
		}
	}
	return n
}

// listFiles fills o.all with the recording's files, in the order
// checkpoints write them.
func (o *openRecording) listFiles() {
	o.all = o.all[:0]
	for _, s := range o.streams {
		o.all = append(o.all, s.dat, s.sn, s.ts)
	}
	for _, t := range o.ttl {
		o.all = append(o.all, t.states, t.sn, t.ts, t.words)
	}
	o.all = append(o.all, o.msgs.sn, o.msgs.ts)
}

// writeText rewrites text.npy (fixed-width |S<n>, n the longest message)
// when messages were added since it was last written.
func (m *messageChannel) writeText() error {
	n := int(m.sn.inHead)
	if n == m.written || n == 0 {
		return nil
	}
	width := max(m.width, 1)
	data := make([]byte, n*width)
	for i, t := range m.texts[:n] {
		copy(data[i*width:], t)
	}
	descr := fmt.Sprintf("|S%d", width)
	if err := writeFileAtomic(filepath.Join(m.dir, "text.npy"), npyBytes(descr, int64(n), data)); err != nil {
		return err
	}
	m.written = n
	return nil
}

// writeOebin rewrites structure.oebin when the set of event channels with
// events on disk changed, or when final is set. It lists only event channels
// that hold events (neo 0.11 fails on empty ones) and is written only once
// the continuous stream holds samples (neo fails on an empty one; without
// structure.oebin readers skip the folder).
func (o *openRecording) writeOebin(r *Recorder, final bool) error {
	if o.streams[0].sn.inHead == 0 {
		return nil
	}
	changed := !o.oebin || final
	for _, t := range o.ttl {
		if !t.listed && t.sn.inHead > 0 {
			changed = true
		}
	}
	if !o.msgs.listed && o.msgs.written > 0 {
		changed = true
	}
	if o.spikes.unlisted() {
		changed = true
	}
	if !changed {
		return nil
	}
	names := make([]string, len(o.streams))
	for i, cs := range o.streams {
		names[i] = cs.name
	}
	doc := r.oebinDoc(names, func(i int) bool { return o.ttl[i].sn.inHead > 0 }, o.msgs.written > 0)
	doc.Spikes = o.spikes.oebinEntries()
	data, err := marshalOebin(&doc)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(filepath.Join(o.dir, "structure.oebin"), data); err != nil {
		return err
	}
	o.oebin = true
	o.spikes.markListed()
	for _, t := range o.ttl {
		t.listed = t.sn.inHead > 0
	}
	o.msgs.listed = o.msgs.written > 0
	return nil
}

// oebinDoc is the structure.oebin of a recording of the streams of the
// given names, listing the TTL channels i for which ttl(i) holds and, with
// messages, the MessageCenter channel.
func (r *Recorder) oebinDoc(streamNames []string, ttl func(i int) bool, messages bool) oebin {
	s := &r.cfg.Stream
	doc := oebin{GUIVersion: r.cfg.GUIVersion}
	for _, name := range streamNames {
		c := oebinContinuous{
			FolderName:          sourceFolder(s.ProcessorName, s.ProcessorID, name) + "/",
			SampleRate:          s.SampleRate,
			SourceProcessorName: s.ProcessorName,
			SourceProcessorID:   s.ProcessorID,
			StreamName:          name,
			RecordedProcessor:   s.ProcessorName,
			RecordedProcessorID: s.ProcessorID,
			NumChannels:         len(s.Channels),
		}
		for _, ch := range s.Channels {
			c.Channels = append(c.Channels, oebinChannel{
				ChannelName: ch.Name, Description: ch.Description,
				BitVolts: ch.BitVolts, Units: ch.Units,
			})
		}
		doc.Continuous = append(doc.Continuous, c)
	}
	// The source's TTL channel goes last: neo 0.11 (Debian 12) names event
	// streams by the last folder only, so of several "TTL" folders it shows
	// the last listed, and the device's inputs matter more than a stage's.
	zero := 0
	for k := range r.ttlFolders {
		i := (k + 1) % len(r.ttlFolders)
		if !ttl(i) {
			continue
		}
		doc.Events = append(doc.Events, oebinEvent{
			FolderName:      filepath.ToSlash(r.ttlFolders[i]) + "/",
			ChannelName:     r.ttlNames[i],
			SampleRate:      s.SampleRate,
			Type:            "int16",
			NumChannels:     1,
			SourceProcessor: r.ttlProcs[i],
			StreamName:      s.StreamName,
			InitialState:    &zero,
		})
	}
	if messages {
		doc.Events = append(doc.Events, oebinEvent{
			FolderName:      messageCenterFolder + "/",
			ChannelName:     "Messages",
			Description:     "Broadcasts messages from the MessageCenter",
			Identifier:      "messagecenter.events",
			SampleRate:      s.SampleRate,
			Type:            "string",
			NumChannels:     1,
			SourceProcessor: "Message Center",
			StreamName:      s.StreamName,
		})
	}
	return doc
}

// fsyncPolicy is the policy in force.
func (r *Recorder) fsyncPolicy() FsyncPolicy {
	if r.cfg.Fsync == FsyncCheckpoint {
		return FsyncCheckpoint
	}
	return FsyncClose
}

// writeMarker writes the UnfinishedMarker of a recording about to start in
// dir: who writes it, and the structure.oebin it may come to have.
func (r *Recorder) writeMarker(dir string, now time.Time) error {
	names := []string{r.cfg.Stream.StreamName}
	if r.cfg.RecordRaw {
		names = append(names, r.cfg.Stream.StreamName+"_raw")
	}
	doc := r.oebinDoc(names, func(int) bool { return true }, true)
	ob, err := marshalOebin(&doc)
	if err != nil {
		return err
	}
	start, _ := processStartTime(os.Getpid())
	data, err := json.MarshalIndent(marker{
		Note: markerNote, PID: os.Getpid(), BootID: currentBootID(), ProcessStart: start,
		Started: now.Format(time.RFC3339Nano), Fsync: string(r.fsyncPolicy()), Oebin: ob,
	}, "", "  ")
	if err != nil {
		return fmt.Errorf("recording: encode %s: %w", UnfinishedMarker, err)
	}
	return writeFileAtomic(filepath.Join(dir, UnfinishedMarker), append(data, '\n'))
}

// closeRecording writes the open recording out completely and closes it.
func (r *Recorder) closeRecording() error {
	o := r.rec
	err := r.checkpoint()
	if err == nil {
		err = o.writeOebin(r, true)
	}
	r.rec = nil
	if err != nil {
		o.abandon()
		return err
	}
	for _, f := range o.all {
		if cerr := f.close(); cerr != nil && err == nil {
			err = cerr
		}
	}
	if err == nil {
		// Finalised: every file is complete and synced.
		m := filepath.Join(o.dir, UnfinishedMarker)
		if rerr := os.Remove(m); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			return fileError("remove", m, rerr)
		}
		syncDir(o.dir)
	}
	return err
}

// abandon closes the recording's files without writing more.
func (o *openRecording) abandon() {
	for _, s := range o.streams {
		s.abandon()
	}
	for _, t := range o.ttl {
		t.states.abandon()
		t.sn.abandon()
		t.ts.abandon()
		t.words.abandon()
	}
	if o.msgs != nil {
		o.msgs.sn.abandon()
		o.msgs.ts.abandon()
	}
	o.spikes.abandon()
}

func (s *contStream) abandon() {
	for _, f := range []*recordFile{s.dat, s.sn, s.ts} {
		if f != nil {
			f.abandon()
		}
	}
}

// ticker checkpoints a recording whose source stopped delivering blocks, so
// that buffered data reaches the disk within about one checkpoint interval.
func (r *Recorder) ticker(stop <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	t := time.NewTicker(max(r.interval/4, time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			r.mu.Lock()
			if r.rec != nil && r.err == nil && r.dirty && time.Since(r.lastCheckpoint) >= r.interval {
				if err := r.checkpoint(); err != nil {
					if r.failRecording(r.cur, err, 0) != nil {
						r.log.Error("recording checkpoint failed; recording stopped", zap.Error(err))
					}
				}
			}
			report := r.takeReports()
			r.mu.Unlock()
			for _, f := range report {
				f()
			}
		}
	}
}
