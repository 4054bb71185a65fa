package recording

import (
	"encoding/binary"
	"fmt"
	"math"
	"path/filepath"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/pipeline"
)

// SpikeSource is a processor that makes spikes, such as the spike detector,
// with the electrodes it detects on. Its description puts the electrodes'
// channels and peak alignment in structure.oebin. Python stages need none:
// their spikes are recorded under their EventChannel's processor name, and
// an electrode they name like one described here (a detected spike
// relabelled) is described the same way.
type SpikeSource struct {
	ProcessorID   int
	ProcessorName string // e.g. "Spike Detector"
	Electrodes    []Electrode
}

// Electrode is one electrode of a SpikeSource: a group of the stream's
// channels on which spikes are detected together.
type Electrode struct {
	Name string // as in pipeline.Spike.Electrode
	// Channels are the electrode's channels: 0-based indices into
	// Config.Stream.Channels, in the order of the waveforms' rows.
	Channels []int
	// PrePeakSamples is how many samples of a waveform come before its
	// peak (structure.oebin's pre_peak_samples; post_peak_samples is the
	// rest of the waveform).
	PrePeakSamples int
}

// MaxSpikeElectrodes is the most electrode folders one recording gets;
// spikes of further electrodes are dropped, counted and logged. Each
// electrode holds five open files.
const MaxSpikeElectrodes = 2048

// undescribedBitVolts is the resolution of waveforms.npy for an electrode
// nothing describes when the stream's first channel is not in µV: the
// acquisition board's 0.195 µV.
const undescribedBitVolts = 0.195

// electrodeRef names an electrode of a processor.
type electrodeRef struct {
	proc int
	name string
}

// recorderSpikes is what a Recorder knows about spikes: the names of the
// processors that may make them and the electrodes described.
type recorderSpikes struct {
	procNames map[int]string
	described map[electrodeRef]*Electrode
	byName    map[string][]*Electrode // any processor's, for relabelled spikes
	// bitVolts is the waveform resolution of undescribed electrodes.
	bitVolts float64

	unknownLog, shapeLog pipeline.LogLimiter
}

// newRecorderSpikes checks cfg.SpikeSources against the stream and the
// other processors.
func newRecorderSpikes(cfg *Config) (*recorderSpikes, error) {
	s := &cfg.Stream
	rs := &recorderSpikes{
		procNames: map[int]string{s.ProcessorID: s.ProcessorName},
		described: map[electrodeRef]*Electrode{},
		byName:    map[string][]*Electrode{},
		bitVolts:  undescribedBitVolts,
	}
	if s.Channels[0].Units == "uV" {
		rs.bitVolts = s.Channels[0].BitVolts
	}
	for _, ec := range cfg.EventChannels {
		rs.procNames[ec.ProcessorID] = ec.ProcessorName
	}
	for i := range cfg.SpikeSources {
		src := &cfg.SpikeSources[i]
		if err := checkName("spike source processor name", src.ProcessorName, false); err != nil {
			return nil, err
		}
		if name, taken := rs.procNames[src.ProcessorID]; taken && name != src.ProcessorName {
			return nil, fmt.Errorf("recording: spike source %q: processor id %d is already %q's", src.ProcessorName, src.ProcessorID, name)
		}
		rs.procNames[src.ProcessorID] = src.ProcessorName
		for j := range src.Electrodes {
			e := &src.Electrodes[j]
			where := fmt.Sprintf("recording: spike source %q electrode %d (%q)", src.ProcessorName, j+1, e.Name)
			if e.Name == "" {
				return nil, fmt.Errorf("%s: the electrode has no name", where)
			}
			if len(e.Channels) == 0 {
				return nil, fmt.Errorf("%s: no channels", where)
			}
			for _, c := range e.Channels {
				if c < 0 || c >= len(s.Channels) {
					return nil, fmt.Errorf("%s: channel index %d is outside the stream's %d channels (indices are 0-based)", where, c, len(s.Channels))
				}
			}
			if e.PrePeakSamples < 0 {
				return nil, fmt.Errorf("%s: pre_peak_samples %d is negative", where, e.PrePeakSamples)
			}
			ref := electrodeRef{src.ProcessorID, e.Name}
			if rs.described[ref] != nil {
				return nil, fmt.Errorf("%s: the name is used twice", where)
			}
			rs.described[ref] = e
			rs.byName[e.Name] = append(rs.byName[e.Name], e)
		}
	}
	rs.unknownLog.Interval = 10 * time.Second
	rs.shapeLog.Interval = 10 * time.Second
	return rs, nil
}

// describe returns the description of an electrode of proc with the given
// channel count: its own, else one of the same name and channel count
// (a relabelled spike), else nil.
func (rs *recorderSpikes) describe(proc int, name string, channels int) *Electrode {
	if e := rs.described[electrodeRef{proc, name}]; e != nil && len(e.Channels) == channels {
		return e
	}
	for _, e := range rs.byName[name] {
		if len(e.Channels) == channels {
			return e
		}
	}
	return nil
}

// spikeKey is what puts spikes in one electrode folder: processor,
// electrode name and waveform shape (every row of waveforms.npy has one
// shape).
type spikeKey struct {
	proc              int
	name              string
	channels, samples int
}

// spikeElectrode is the folder of one electrode in an open recording.
type spikeElectrode struct {
	key      spikeKey
	index    uint16 // 1-based position in structure.oebin's spikes list
	bitVolts float64
	inv      float64
	meta     oebinSpike

	waves, sn, ts, idx, clusters *recordFile
	listed                       bool // in the structure.oebin on disk
}

// recordingSpikes are the electrode folders of an open recording, created
// at each electrode's first spike.
type recordingSpikes struct {
	dir        string // <recording>/spikes
	electrodes []*spikeElectrode
	byKey      map[spikeKey]*spikeElectrode
	folders    map[string]bool // folders in use, relative to dir
	shapes     map[electrodeRef]int
}

// writeSpike appends one spike to its electrode's files, creating them at
// the electrode's first spike in the recording. A spike of a processor the
// recorder does not know or with a malformed waveform is dropped, counted
// and logged.
func (r *Recorder) writeSpike(sp *pipeline.Spike) error {
	o := r.rec
	if o.spikes == nil {
		o.spikes = &recordingSpikes{
			dir: filepath.Join(o.dir, "spikes"), byKey: map[spikeKey]*spikeElectrode{},
			folders: map[string]bool{}, shapes: map[electrodeRef]int{},
		}
	}
	rs := o.spikes
	if sp.Channels < 1 || sp.Samples < 1 || len(sp.Waveform) != sp.Channels*sp.Samples {
		r.dropSpike(sp, fmt.Sprintf("its waveform has %d values for %d channels × %d samples", len(sp.Waveform), sp.Channels, sp.Samples))
		return nil
	}
	e := rs.byKey[spikeKey{sp.Processor, sp.Electrode, sp.Channels, sp.Samples}]
	if e == nil {
		var why string
		e, why = r.newSpikeElectrode(sp)
		if e == nil {
			r.dropSpike(sp, why)
			return nil
		}
	}
	rate := r.cfg.Stream.SampleRate
	p, err := e.waves.next(1)
	if err != nil {
		return err
	}
	nans := 0
	for i, x := range sp.Waveform {
		v := float64(x) * e.inv
		q := roundToEven(v)
		if math.Abs(v-q) > 0.5-1e-9 { // within an ulp of a tie: divide, as numpy would
			v = float64(x) / e.bitVolts
			q = roundToEven(v)
		}
		switch {
		case v != v:
			q = 0
			nans++
		case q > math.MaxInt16:
			q = math.MaxInt16
		case q < math.MinInt16:
			q = math.MinInt16
		}
		binary.LittleEndian.PutUint16(p[2*i:], uint16(int16(q)))
	}
	if nans > 0 {
		r.stats.NaNSamples += uint64(nans)
	}
	if err := putRecord(e.sn, func(p []byte) { binary.LittleEndian.PutUint64(p, uint64(sp.SampleNumber)) }); err != nil {
		return err
	}
	if err := putRecord(e.ts, func(p []byte) {
		binary.LittleEndian.PutUint64(p, math.Float64bits(float64(sp.SampleNumber)/rate))
	}); err != nil {
		return err
	}
	if err := putRecord(e.idx, func(p []byte) { binary.LittleEndian.PutUint16(p, e.index) }); err != nil {
		return err
	}
	cluster := uint16(min(max(sp.SortedID, 0), math.MaxUint16))
	if err := putRecord(e.clusters, func(p []byte) { binary.LittleEndian.PutUint16(p, cluster) }); err != nil {
		return err
	}
	r.stats.Spikes++
	return nil
}

// newSpikeElectrode prepares the folder of sp's electrode in the open
// recording (its files are created at the first checkpoint). It returns
// nil and why when the spike cannot be recorded.
func (r *Recorder) newSpikeElectrode(sp *pipeline.Spike) (*spikeElectrode, string) {
	rs := r.rec.spikes
	cfg := r.spikeCfg
	procName, known := cfg.procNames[sp.Processor]
	switch {
	case !known:
		return nil, "no processor with this id is known to the recorder (add it to recording.Config.SpikeSources or EventChannels)"
	case sp.Electrode == "":
		return nil, "the spike names no electrode"
	case len(rs.electrodes) >= MaxSpikeElectrodes:
		return nil, fmt.Sprintf("the recording has %d electrode folders already, the most it gets", MaxSpikeElectrodes)
	}
	s := &r.cfg.Stream
	ref := electrodeRef{sp.Processor, sp.Electrode}
	base := electrodeFolderName(sp.Electrode)
	if rs.shapes[ref] > 0 {
		// Another waveform shape of an electrode already recorded: a folder
		// of its own, since every row of waveforms.npy has one shape.
		base += fmt.Sprintf("_%dx%d", sp.Channels, sp.Samples)
		if ok, more := cfg.shapeLog.Allow(time.Now()); ok {
			r.log.Warn("spikes of one electrode with another waveform shape are recorded in a folder of their own",
				zap.Int("processor", sp.Processor), zap.String("electrode", sp.Electrode),
				zap.Int("channels", sp.Channels), zap.Int("samples", sp.Samples), zap.Int("more_not_logged", more))
		}
	}
	procFolder := sourceFolder(procName, sp.Processor, s.StreamName)
	folder := procFolder + "/" + base
	for k := 2; rs.folders[folder]; k++ {
		folder = procFolder + "/" + base + "_" + strconv.Itoa(k)
	}
	rs.folders[folder] = true
	rs.shapes[ref]++

	e := &spikeElectrode{
		key:   spikeKey{sp.Processor, sp.Electrode, sp.Channels, sp.Samples},
		index: uint16(len(rs.electrodes) + 1),
	}
	meta := oebinSpike{
		Name:                sp.Electrode,
		SourceProcessorID:   sp.Processor,
		SourceProcessorName: procName,
		StreamName:          s.StreamName,
		SampleRate:          s.SampleRate,
		NumChannels:         sp.Channels,
		PostPeakSamples:     sp.Samples,
		Folder:              folder + "/",
	}
	if d := cfg.describe(sp.Processor, sp.Electrode, sp.Channels); d != nil {
		e.bitVolts = s.Channels[d.Channels[0]].BitVolts
		if d.PrePeakSamples <= sp.Samples {
			meta.PrePeakSamples = d.PrePeakSamples
			meta.PostPeakSamples = sp.Samples - d.PrePeakSamples
		}
		for _, c := range d.Channels {
			meta.SourceChannels = append(meta.SourceChannels, oebinSpikeChannel{
				Name: s.Channels[c].Name, LocalIndex: c, BitVolts: e.bitVolts,
			})
		}
	} else {
		// Nothing says which of the stream's channels the waveform's rows
		// are, nor where its peak is: local_index -1, pre_peak_samples 0.
		e.bitVolts = cfg.bitVolts
		for c := 0; c < sp.Channels; c++ {
			meta.SourceChannels = append(meta.SourceChannels, oebinSpikeChannel{LocalIndex: -1, BitVolts: e.bitVolts})
		}
	}
	e.inv = 1 / e.bitVolts
	e.meta = meta

	d := filepath.Join(rs.dir, filepath.FromSlash(folder))
	open := r.cfg.OpenFile
	e.waves = lazyNpy(d, "waveforms.npy", "<i2", 2*sp.Channels*sp.Samples, open)
	e.waves.dims = fmt.Sprintf(", %d, %d", sp.Channels, sp.Samples)
	e.waves.headerSize = npyHeaderSizeDims(e.waves.descr, e.waves.dims)
	e.waves.header = make([]byte, 0, e.waves.headerSize)
	e.sn = lazyNpy(d, "sample_numbers.npy", "<i8", 8, open)
	e.ts = lazyNpy(d, "timestamps.npy", "<f8", 8, open)
	e.idx = lazyNpy(d, "electrode_indices.npy", "<u2", 2, open)
	e.clusters = lazyNpy(d, "clusters.npy", "<u2", 2, open)
	rs.electrodes = append(rs.electrodes, e)
	rs.byKey[e.key] = e
	r.rec.all = append(r.rec.all, e.waves, e.sn, e.ts, e.idx, e.clusters)
	return e, ""
}

func (r *Recorder) dropSpike(sp *pipeline.Spike, why string) {
	r.stats.DroppedSpikes++
	if ok, more := r.spikeCfg.unknownLog.Allow(time.Now()); ok {
		r.log.Warn("spike dropped: "+why, zap.Int("processor", sp.Processor), zap.String("electrode", sp.Electrode),
			zap.Int64("sample_number", sp.SampleNumber), zap.Int("more_not_logged", more))
	}
}

// electrodeFolderName makes an electrode name a folder name: '/', '\\',
// spaces, control characters and the characters Windows forbids become
// '_', a name of dots only becomes "electrode", and it is cut to 100
// bytes (at a character boundary). structure.oebin keeps the name as it
// was.
func electrodeFolderName(name string) string {
	var b strings.Builder
	for _, c := range name {
		if c < 0x20 || c == 0x7f || c == utf8.RuneError || strings.ContainsRune(" /\\:*?\"<>|", c) {
			c = '_'
		}
		if b.Len()+utf8.RuneLen(c) > maxElectrodeFolder {
			break
		}
		b.WriteRune(c)
	}
	if strings.Trim(b.String(), ".") == "" {
		return "electrode"
	}
	return b.String()
}

// maxElectrodeFolder is the longest electrode folder name, in bytes.
const maxElectrodeFolder = 100

// unlisted reports whether an electrode holds spikes on disk that the
// structure.oebin on disk does not list.
func (rs *recordingSpikes) unlisted() bool {
	if rs == nil {
		return false
	}
	for _, e := range rs.electrodes {
		if !e.listed && e.sn.inHead > 0 {
			return true
		}
	}
	return false
}

// oebinEntries is structure.oebin's spikes list: the electrodes whose
// files hold spikes, in the order of their first spike (their index).
func (rs *recordingSpikes) oebinEntries() []oebinSpike {
	if rs == nil {
		return nil
	}
	var out []oebinSpike
	for _, e := range rs.electrodes {
		if e.sn.inHead > 0 {
			out = append(out, e.meta)
		}
	}
	return out
}

// markListed records that the structure.oebin just written lists the
// electrodes holding spikes.
func (rs *recordingSpikes) markListed() {
	if rs == nil {
		return
	}
	for _, e := range rs.electrodes {
		e.listed = e.sn.inHead > 0
	}
}

// abandon closes the electrodes' files without writing more.
func (rs *recordingSpikes) abandon() {
	if rs == nil {
		return
	}
	for _, e := range rs.electrodes {
		for _, f := range []*recordFile{e.waves, e.sn, e.ts, e.idx, e.clusters} {
			f.abandon()
		}
	}
}
