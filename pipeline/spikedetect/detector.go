// Package spikedetect is ephysd's built-in spike detector: a pipeline stage,
// run before the Python stages, that finds threshold crossings on groups of
// channels (electrodes: single channels, stereotrodes, tetrodes, any group),
// aligns each spike on its peak and appends it, with its waveform, to the
// block's Spikes.
//
// Detection. An electrode detects a spike when any of its channels crosses
// its threshold: from above −T to −T or below (polarity "negative", the
// default), from below +T to +T or above ("positive"), or either
// ("both"). T is threshold_uv µV, or threshold_mad × the channel's noise
// σ̂ = median(|x|) / 0.6745. The peak is the most negative sample
// (negative), the most positive (positive) or the largest in absolute value
// (both) over the electrode's channels in the search window: the crossing's
// sample and the peak_search_samples − 1 after it (the earliest sample, then
// the first channel in the electrode's order, wins a tie). The spike's
// sample number is the peak's; its waveform is the samples peak −
// pre_peak_samples … peak + waveform_samples − pre_peak_samples − 1 of every
// channel of the electrode, channel-major, exactly as the detector saw them
// (the input samples, or their high-pass with highpass_hz > 0), in µV. After
// a peak the electrode detects nothing for dead_time_ms, nor before its
// search window has ended; a crossing needs the sample before it, so it is
// looked for again only once the signal has gone back over the threshold.
//
// Which block a spike belongs to. A spike is appended to the block that
// holds the last sample of its waveform — the first block in which it is
// complete — so that the Python stages' handle_spike sees it, whole, before
// that block's process. Its peak may lie in an earlier block. Spikes appended
// by the detector to one block are in sample-number order.
//
// Noise. Each channel's σ̂ comes from 1024 values: first the stream's
// first 1024 samples (a quick first estimate, 34 ms at 30 kHz), then every
// (noise_window_s × rate / 1024)-th sample, so it follows the last
// noise_window_s of signal. It is renewed every noise_update_s, a few
// channels per block, never all in one block. Until a channel has its first
// estimate it detects nothing. σ̂ assumes a signal centred on zero:
// without highpass_hz, give the detector a high-passed (spike-band) signal.
//
// Gaps. A jump in sample numbers (lost samples) ends the spikes whose
// waveform would span it: they are dropped and counted (Cut), never padded.
// So are spikes whose waveform would start before the stream's first sample.
//
// Memory. Nothing is allocated per block in steady state. Waveforms live in
// buffers that belong to the block: the detector reuses the Waveform buffer
// that an earlier use of the same pooled block left in b.Spikes's spare
// capacity, and grows a block's buffers only when it holds more spikes than
// ever before.
package spikedetect

import (
	"fmt"
	"math"
	"math/bits"
	"sync/atomic"

	"github.com/ephysd/ephysd/pipeline"
)

// StageName is the detector's stage name.
const StageName = "Spike Detector"

// Stream is what the detector needs to know of the stream it works on.
type Stream struct {
	Channels     int
	SampleRate   float64
	BlockSamples int // the most samples a block holds
	// Processor is the processor id the spikes carry: the detector's own
	// (Open Ephys's Spike Detector is a processor of the chain).
	Processor int
}

// Electrode describes one configured electrode.
type Electrode struct {
	Index    int    // position in configuration order, from 0
	Name     string // as in Spike.Electrode
	Channels []int  // 0-based channel indices in the block
	// ThresholdUV is the fixed threshold magnitude, or 0 when the
	// threshold is ThresholdMAD × each channel's noise σ̂.
	ThresholdUV  float64
	ThresholdMAD float64
	Polarity     Polarity
	// Samples and PrePeakSamples are the waveform's length and how many
	// of its samples come before the peak.
	Samples, PrePeakSamples int
}

// Detector is the spike detector stage. Process, the hooks and NoiseUV run
// on the stage thread; Counts and Cut may be called from any goroutine.
type Detector struct {
	stream  Stream
	elec    []electrode
	info    []Electrode
	used    []int // source channels that belong to some electrode
	mask    int64 // ring length − 1
	ringLen int
	ring    []float32 // per used channel, the detector's signal by sample number mod ring length
	hp      *highpass
	noise   noise
	pre     int
	length  int
	search  int64
	dead    int64
	slot    int // float32s of one waveform buffer (largest electrode × length)

	started bool
	first   int64 // first sample number of the stream (or since the last gap)
	next    int64 // expected sample number of the next block

	cut atomic.Uint64
}

// pendingSpike is a peak whose waveform is not complete yet.
type pendingSpike struct{ peak int64 }

type electrode struct {
	index int
	name  string
	local []int // indices into the used channels
	mad   float32
	uv    float32
	pol   Polarity
	thr   []float32 // per channel, the current threshold magnitude (+Inf: none yet)

	searching bool
	crossing  int64
	peakAt    int64
	peakVal   float32
	allowFrom int64 // first sample number at which a crossing may start a spike

	pending []pendingSpike // a FIFO: pending[head:head+n] (mod cap)
	head, n int

	count atomic.Uint64
}

// New makes a detector for a stream. It checks cfg (Validate) and that
// every channel exists in the stream.
func New(cfg Config, s Stream) (*Detector, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if s.Channels < 1 || !(s.SampleRate > 0) || s.BlockSamples < 1 {
		return nil, fmt.Errorf("spike detector: stream of %d channels at %v Hz, blocks of %d samples: every number must be positive", s.Channels, s.SampleRate, s.BlockSamples)
	}
	if cfg.HighpassHz > 0 && cfg.HighpassHz >= s.SampleRate/2 {
		return nil, &KeyError{Key: "highpass_hz", Msg: fmt.Sprintf("%v Hz is not below half the sample rate (%v Hz)", cfg.HighpassHz, s.SampleRate/2)}
	}
	if err := cfg.CheckChannels(s.Channels); err != nil {
		return nil, err
	}
	groups := cfg.groups(s.Channels)
	names := cfg.names(s.Channels)
	d := &Detector{
		stream: s,
		pre:    cfg.PrePeakSamples,
		length: cfg.WaveformSamples,
		search: int64(cfg.PeakSearchSamples),
		dead:   int64(math.Round(cfg.DeadTimeMS * s.SampleRate / 1000)),
	}
	local := make([]int, s.Channels)
	for i := range local {
		local[i] = -1
	}
	widest := 0
	post := cfg.WaveformSamples - cfg.PrePeakSamples
	// Pending spikes have crossings at least search samples apart, all
	// within the last post + search samples.
	pendingCap := (post+cfg.PeakSearchSamples)/cfg.PeakSearchSamples + 2
	d.elec = make([]electrode, len(groups))
	for i, g := range groups {
		e := &d.elec[i]
		e.index, e.name, e.pol = i, names[i], cfg.Polarity
		e.thr = make([]float32, len(g))
		e.pending = make([]pendingSpike, pendingCap)
		uv, mad := cfg.ThresholdUV, cfg.ThresholdMAD
		if i < len(cfg.Electrodes) {
			ec := cfg.Electrodes[i]
			if ec.ThresholdUV != nil || ec.ThresholdMAD != nil {
				uv, mad = ec.ThresholdUV, ec.ThresholdMAD
			}
			if ec.Polarity != "" {
				e.pol = ec.Polarity
			}
		}
		info := Electrode{Index: i, Name: names[i], Polarity: e.pol, Samples: cfg.WaveformSamples, PrePeakSamples: cfg.PrePeakSamples}
		switch {
		case uv != nil:
			e.uv, info.ThresholdUV = float32(*uv), *uv
		case mad != nil:
			e.mad, info.ThresholdMAD = float32(*mad), *mad
		default:
			e.mad, info.ThresholdMAD = DefaultThresholdMAD, DefaultThresholdMAD
		}
		for _, ch := range g {
			c := ch - 1
			if local[c] < 0 {
				local[c] = len(d.used)
				d.used = append(d.used, c)
			}
			e.local = append(e.local, local[c])
			info.Channels = append(info.Channels, c)
		}
		widest = max(widest, len(g))
		d.info = append(d.info, info)
	}
	d.slot = widest * d.length
	// The ring holds a block plus everything a spike completed in it may
	// reach back to: its waveform, or its search window and pre-peak
	// samples, and the sample before a crossing.
	need := s.BlockSamples + max(d.length, cfg.PeakSearchSamples+d.pre) + 2
	d.ringLen = 1 << bits.Len(uint(need-1))
	d.mask = int64(d.ringLen - 1)
	d.ring = make([]float32, len(d.used)*d.ringLen)
	if cfg.HighpassHz > 0 {
		hp := newHighpass(len(d.used), cfg.HighpassHz, s.SampleRate)
		d.hp = &hp
	}
	d.noise = newNoise(len(d.used), s.SampleRate, cfg.NoiseWindowS, cfg.NoiseUpdateS)
	d.updateThresholds()
	return d, nil
}

// Name implements pipeline.Stage.
func (d *Detector) Name() string { return StageName }

// Electrodes describes the electrodes, in configuration order (Spike's
// ElectrodeIndex indexes this list).
func (d *Detector) Electrodes() []Electrode { return d.info }

// Processor is the processor id the spikes carry.
func (d *Detector) Processor() int { return d.stream.Processor }

// Counts returns the number of spikes detected so far per electrode, in
// configuration order.
func (d *Detector) Counts() []uint64 {
	out := make([]uint64, len(d.elec))
	for i := range d.elec {
		out[i] = d.elec[i].count.Load()
	}
	return out
}

// Cut is the number of spikes dropped because their waveform would have
// spanned a gap in the sample numbers or the start of the stream.
func (d *Detector) Cut() uint64 { return d.cut.Load() }

// NoiseUV returns the current noise σ̂ of channel ch (0-based) in µV, or 0
// when the channel has no estimate yet or belongs to no electrode.
func (d *Detector) NoiseUV(ch int) float64 {
	for i, c := range d.used {
		if c == ch {
			if s := d.noise.sigma[i]; s > math.SmallestNonzeroFloat32 {
				return float64(s)
			}
		}
	}
	return 0
}

// StartAcquisition implements pipeline.AcquisitionHooks: the detector
// starts afresh (no history, no noise estimates).
func (d *Detector) StartAcquisition() error {
	d.started = false
	d.noise.reset()
	d.updateThresholds()
	return nil
}

// StopAcquisition implements pipeline.AcquisitionHooks. Spikes still
// waiting for the rest of their waveform are dropped and counted as cut.
func (d *Detector) StopAcquisition() error {
	d.restart()
	d.started = false
	return nil
}

// restart drops the spikes in progress (waiting for their waveform or
// their peak), counting them as cut.
func (d *Detector) restart() {
	var cut uint64
	for i := range d.elec {
		e := &d.elec[i]
		cut += uint64(e.n)
		if e.searching {
			cut++
		}
		e.head, e.n = 0, 0
		e.searching = false
		e.allowFrom = math.MinInt64
	}
	if cut > 0 {
		d.cut.Add(cut)
	}
	if d.hp != nil {
		d.hp.restart()
	}
}

// updateThresholds sets the MAD-based thresholds from the noise estimates.
func (d *Detector) updateThresholds() {
	for i := range d.elec {
		e := &d.elec[i]
		for j, l := range e.local {
			switch {
			case e.uv > 0:
				e.thr[j] = e.uv
			case d.noise.sigma[l] > 0:
				e.thr[j] = e.mad * d.noise.sigma[l]
			default:
				e.thr[j] = float32(math.Inf(1))
			}
		}
	}
}

// Process implements pipeline.Stage: it appends the spikes completed in b
// to b.Spikes. It does not change b's samples.
func (d *Detector) Process(b *pipeline.Block) error {
	n := b.Samples
	if b.Channels != d.stream.Channels {
		return fmt.Errorf("spike detector: block has %d channels, the detector was made for %d", b.Channels, d.stream.Channels)
	}
	if n > d.stream.BlockSamples {
		return fmt.Errorf("spike detector: block of %d samples is longer than the %d the detector was made for", n, d.stream.BlockSamples)
	}
	if n < 1 {
		return nil
	}
	first := b.FirstSample
	if !d.started || first != d.next {
		if d.started {
			d.restart()
		}
		d.started = true
		d.first = first
		for i := range d.elec {
			d.elec[i].allowFrom = first + 1 // a crossing needs the sample before it
		}
	}
	d.next = first + int64(n)

	// The detector's signal into the rings, and into the noise estimate.
	off := int(first & d.mask)
	k := min(n, d.ringLen-off)
	if d.hp == nil {
		for l, c := range d.used {
			src := b.Data[c*n : c*n+n]
			ring := d.ring[l*d.ringLen : (l+1)*d.ringLen]
			copy(ring[off:off+k], src[:k])
			copy(ring[:n-k], src[k:])
		}
	} else {
		// Two channels at a time (see filter2).
		for l := 0; l < len(d.used); l += 2 {
			c := d.used[l]
			src := b.Data[c*n : c*n+n]
			ring := d.ring[l*d.ringLen : (l+1)*d.ringLen]
			if l+1 == len(d.used) {
				d.hp.filter(l, ring[off:off+k], src[:k])
				d.hp.filter(l, ring[:n-k], src[k:])
				break
			}
			c2 := d.used[l+1]
			src2 := b.Data[c2*n : c2*n+n]
			ring2 := d.ring[(l+1)*d.ringLen : (l+2)*d.ringLen]
			d.hp.filter2(l, l+1, ring[off:off+k], src[:k], ring2[off:off+k], src2[:k])
			if k < n {
				d.hp.filter2(l, l+1, ring[:n-k], src[k:], ring2[:n-k], src2[k:])
			}
		}
	}
	d.noise.add(first, n, func(l, i int) float32 { return d.ring[l*d.ringLen+(off+i)&int(d.mask)] })
	if d.noise.estimate(first+int64(n)-1, n) {
		d.updateThresholds()
	}

	before := len(b.Spikes)
	end := first + int64(n)
	for i := range d.elec {
		d.scan(&d.elec[i], b, first, end)
	}
	sortSpikes(b.Spikes[before:])
	return nil
}

// scan runs electrode e over the samples first..end−1 (already in the
// rings) and appends the spikes completed by end−1 to b.
func (d *Detector) scan(e *electrode, b *pipeline.Block, first, end int64) {
	post := int64(d.length - d.pre)
	// Spikes from earlier blocks that this block completes.
	for e.n > 0 {
		p := e.pending[e.head]
		if p.peak+post-1 >= end {
			break
		}
		d.emit(e, b, p.peak)
		e.head = (e.head + 1) % len(e.pending)
		e.n--
	}
	t := first
	for t < end {
		if e.searching {
			stop := min(end, e.crossing+d.search)
			d.searchPeak(e, t, stop)
			t = stop
			if t < e.crossing+d.search {
				break // the window goes on in the next block
			}
			e.searching = false
			peak := e.peakAt
			e.allowFrom = max(e.crossing+d.search, peak+d.dead)
			switch {
			case peak-int64(d.pre) < d.first:
				d.cut.Add(1) // the waveform would start before the stream (or a gap)
			case e.n == 0 && peak+post-1 < end:
				d.emit(e, b, peak)
			default:
				if e.n == len(e.pending) {
					// Cannot happen (the FIFO is sized for the most
					// spikes that can be in progress); dropped, counted.
					d.cut.Add(1)
					continue
				}
				e.pending[(e.head+e.n)%len(e.pending)] = pendingSpike{peak: peak}
				e.n++
			}
			continue
		}
		from := max(t, e.allowFrom)
		if from >= end {
			break
		}
		tc := d.findCrossing(e, from, end)
		if tc == end {
			break
		}
		e.searching = true
		e.crossing = tc
		e.peakAt = tc
		e.peakVal = float32(math.Inf(-1))
		t = tc
	}
}

// findCrossing returns the first sample number in from..end−1 at which a
// channel of e crosses its threshold, or end.
func (d *Detector) findCrossing(e *electrode, from, end int64) int64 {
	best := end
	for j, l := range e.local {
		ring := d.ring[l*d.ringLen : (l+1)*d.ringLen]
		prev := ring[(from-1)&d.mask]
		// The ring positions of from..best−1, in at most two pieces.
		for s := from; s < best; {
			off := int(s & d.mask)
			x := ring[off:min(len(ring), off+int(best-s))]
			var i int
			switch e.pol {
			case Negative:
				i = crossDown(x, prev, -e.thr[j])
			case Positive:
				i = crossUp(x, prev, e.thr[j])
			default:
				i = crossDown(x, prev, -e.thr[j])
				if up := crossUp(x, prev, e.thr[j]); up >= 0 && (i < 0 || up < i) {
					i = up
				}
			}
			if i >= 0 {
				best = s + int64(i)
				break
			}
			prev = x[len(x)-1]
			s += int64(len(x))
		}
	}
	return best
}

// crossDown returns the index of the first value of x at or below level
// whose predecessor (prev for x[0]) is above it, or −1.
func crossDown(x []float32, prev, level float32) int {
	if len(x) == 0 {
		return -1
	}
	if x[0] <= level && prev > level {
		return 0
	}
	for i := 1; i < len(x); i++ {
		if x[i] <= level && x[i-1] > level {
			return i
		}
	}
	return -1
}

// crossUp returns the index of the first value of x at or above level
// whose predecessor (prev for x[0]) is below it, or −1.
func crossUp(x []float32, prev, level float32) int {
	if len(x) == 0 {
		return -1
	}
	if x[0] >= level && prev < level {
		return 0
	}
	for i := 1; i < len(x); i++ {
		if x[i] >= level && x[i-1] < level {
			return i
		}
	}
	return -1
}

// searchPeak looks for e's peak among the samples from..stop−1.
func (d *Detector) searchPeak(e *electrode, from, stop int64) {
	mask := d.mask
	for s := from; s < stop; s++ {
		for _, l := range e.local {
			v := d.ring[l*d.ringLen+int(s&mask)]
			var m float32
			switch e.pol {
			case Negative:
				m = -v
			case Positive:
				m = v
			default:
				m = float32(math.Abs(float64(v)))
			}
			if m > e.peakVal {
				e.peakVal, e.peakAt = m, s
			}
		}
	}
}

// emit appends e's spike with its peak at sample number peak to b.
func (d *Detector) emit(e *electrode, b *pipeline.Block, peak int64) {
	size := len(e.local) * d.length
	sp := d.nextSpike(b, size)
	start := peak - int64(d.pre)
	for j, l := range e.local {
		ring := d.ring[l*d.ringLen : (l+1)*d.ringLen]
		dst := sp.Waveform[j*d.length : (j+1)*d.length]
		off := int(start & d.mask)
		k := copy(dst, ring[off:])
		copy(dst[k:], ring)
	}
	sp.Processor = d.stream.Processor
	sp.Electrode = e.name
	sp.ElectrodeIndex = e.index
	sp.SampleNumber = peak
	sp.SortedID = 0
	sp.Channels = len(e.local)
	sp.Samples = d.length
	e.count.Add(1)
}

// nextSpike extends b.Spikes by one and returns the new element with a
// Waveform of size float32s: the buffer an earlier use of the block left
// there when it is large enough, else a new one.
func (d *Detector) nextSpike(b *pipeline.Block, size int) *pipeline.Spike {
	n := len(b.Spikes)
	if n == cap(b.Spikes) {
		grown := make([]pipeline.Spike, n, max(8, 2*n))
		copy(grown, b.Spikes)
		// Buffers for the new spare elements, in one allocation.
		spare := cap(grown) - n
		arena := make([]float32, spare*d.slot)
		all := grown[:cap(grown)]
		for i := n; i < len(all); i++ {
			k := (i - n) * d.slot
			all[i] = pipeline.Spike{Waveform: arena[k : k+d.slot : k+d.slot]}
		}
		b.Spikes = grown
	}
	b.Spikes = b.Spikes[:n+1]
	sp := &b.Spikes[n]
	if cap(sp.Waveform) < size {
		sp.Waveform = make([]float32, size, max(size, d.slot))
	}
	sp.Waveform = sp.Waveform[:size]
	return sp
}

// sortSpikes puts s in sample-number order, keeping the order of equal
// ones (electrode order).
func sortSpikes(s []pipeline.Spike) {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j].SampleNumber < s[j-1].SampleNumber; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}
