package sim

import (
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/pipeline"
)

// Stream description of the simulated headstage.
const (
	ProcessorName  = "Simulated Headstage"
	ProcessorID    = 100
	StreamName     = "sim"
	BitVolts       = 0.195 // µV per int16 step, as an Intan headstage
	TTLLines       = 2
	TTLChannelName = "TTL Input"
)

const (
	// noiseTableLen is the number of precomputed Gaussian values (1 MiB,
	// small enough to stay in a core's L2 cache).
	noiseTableLen = 1 << 18
	// chunkLen is the length of the stretches of samples that read the
	// noise table contiguously; each (chunk, channel) gets its own
	// pseudo-random table offset, so the noise depends only on the sample
	// number, never on how the stream is cut into blocks.
	chunkLen = 4096
	// spikeSpread is how many neighbouring channels on each side of a
	// unit's peak channel see its spikes.
	spikeSpread = 2
	// maxPulses is the most line-1 pulses in one second.
	maxPulses = 5
	// lfpPhases is the number of distinct LFP phases along the array, and
	// maxPhase the phase of the last channel.
	lfpPhases = 32
	maxPhase  = 0.83 * math.Pi
)

// Source is the simulated headstage. Make one with Config.Open or New.
// ReadBlock must be called from one goroutine; Stop may be called from any.
type Source struct {
	cfg  Config
	nch  int
	rate int64
	info pipeline.StreamInfo

	noise []float32 // Gaussian table, already scaled to NoiseUV
	sin   []float32 // sin(2πk/rate), k = 0..rate-1
	gain  []float32 // per-channel LFP amplitude
	phase []int     // per-channel LFP phase (index into the phase set)
	phCos []float32 // weights of the in-phase and quadrature components
	phSin []float32 // of each phase of the set
	l1    []float32 // LFP components of the current block (scratch)
	l2    []float32
	lfpK  []float32 // the LFP at every phase of the set, phase-major (scratch)
	units []unit
	plant []float32 // the planted waveform, 1 µV deep

	next int64 // sample number of the next block

	pulseSec   int64 // second whose line-1 pulses are cached
	pulseN     int
	pulseStart [maxPulses]int64 // offsets within the second
	pulseEnd   [maxPulses]int64

	clock *drivers.Clock
}

// unit is one simulated neuron: a waveform template, the channels it is
// seen on, and its Poisson spike train.
type unit struct {
	peak     int       // channel with the largest spikes (0-based)
	lo, hi   int       // channels lo..hi-1 see the spikes
	gain     []float32 // per channel lo..hi-1, 1 at the peak channel
	template []float32 // µV, at the peak channel, for scale 1
	rate     float64   // mean firing rate, Hz
	dead     int64     // refractory period in samples (≥ len(template))
	rng      *rand.Rand

	prevStart int64 // last spike that started, or -1
	prevScale float32
	nextStart int64 // next spike
	nextScale float32
}

// New makes a source from a configuration that has passed Validate.
func New(cfg Config) (*Source, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	s := &Source{
		cfg:      cfg,
		nch:      cfg.Channels,
		rate:     int64(cfg.Rate),
		clock:    drivers.NewClock(float64(cfg.Rate)),
		pulseSec: -1,
	}
	s.info = pipeline.StreamInfo{
		ProcessorName:  ProcessorName,
		ProcessorID:    ProcessorID,
		StreamName:     StreamName,
		SampleRate:     float64(cfg.Rate),
		Channels:       make([]pipeline.ChannelInfo, cfg.Channels),
		TTLLines:       TTLLines,
		TTLChannelName: TTLChannelName,
	}
	for c := range s.info.Channels {
		s.info.Channels[c] = pipeline.ChannelInfo{
			Name:        fmt.Sprintf("CH%d", c+1),
			Units:       "uV",
			BitVolts:    BitVolts,
			Description: "simulated headstage channel",
		}
	}
	seed := uint64(cfg.Seed)

	// Background noise table.
	rng := rand.New(rand.NewPCG(seed, 0x6e6f697365))
	s.noise = make([]float32, noiseTableLen)
	for i := range s.noise {
		s.noise[i] = float32(rng.NormFloat64() * cfg.NoiseUV)
	}

	// One period of a sine at 1 Hz, indexed by sample within the second.
	s.sin = make([]float32, cfg.Rate)
	for k := range s.sin {
		s.sin[k] = float32(math.Sin(2 * math.Pi * float64(k) / float64(cfg.Rate)))
	}

	// LFP: strongest in the upper part of the array, phase turning by
	// about 150° from the first to the last channel (like hippocampal theta
	// across the layers), with a few percent of per-channel gain jitter.
	// Phases come from a set of lfpPhases so that the field is computed
	// once per phase and sample, not once per channel and sample.
	rng = rand.New(rand.NewPCG(seed, 0x6c6670))
	s.gain = make([]float32, s.nch)
	s.phase = make([]int, s.nch)
	s.phCos = make([]float32, lfpPhases)
	s.phSin = make([]float32, lfpPhases)
	for k := range lfpPhases {
		phi := maxPhase * float64(k) / (lfpPhases - 1)
		s.phCos[k] = float32(math.Cos(phi))
		s.phSin[k] = float32(math.Sin(phi))
	}
	for c := 0; c < s.nch; c++ {
		x := float64(c) / float64(s.nch)
		s.gain[c] = float32(cfg.LFPUV * (0.55 + 0.45*math.Cos(math.Pi*(x-0.3))) * (1 + 0.05*(2*rng.Float64()-1)))
		s.phase[c] = int(math.Round(x * (lfpPhases - 1)))
	}

	s.makeUnits(seed)
	s.plant, _ = PlantTemplate(cfg.Rate)
	return s, nil
}

// makeUnits places the units and gives each its waveform and firing rate.
func (s *Source) makeUnits(seed uint64) {
	n := s.cfg.Units
	s.units = make([]unit, n)
	rate := float64(s.rate)
	for i := range s.units {
		u := &s.units[i]
		r := rand.New(rand.NewPCG(seed, 0x756e6974+uint64(i)))
		if len(s.cfg.SpikeChannels) > 0 {
			u.peak = s.cfg.SpikeChannels[i%len(s.cfg.SpikeChannels)] - 1
		} else {
			u.peak = int((2*int64(i) + 1) * int64(s.nch) / int64(2*n))
		}
		u.lo = max(0, u.peak-spikeSpread)
		u.hi = min(s.nch, u.peak+spikeSpread+1)
		falloff := 0.35 + 0.35*r.Float64() // amplitude ratio per channel of distance
		u.gain = make([]float32, u.hi-u.lo)
		for c := u.lo; c < u.hi; c++ {
			d := c - u.peak
			if d < 0 {
				d = -d
			}
			u.gain[c-u.lo] = float32(math.Pow(falloff, float64(d)))
		}

		// Waveform: a Gaussian trough followed by a slower positive
		// repolarisation lobe. Amplitudes grow by 30% from unit to unit
		// (eight steps, then again), so units are told apart by size as
		// well as by width and shape.
		amp := 60 * math.Pow(1.3, float64(i%8))
		width := 0.08 + 0.12*r.Float64() // trough σ, ms
		lobe := 0.15 + 0.35*r.Float64()  // repolarisation lobe / trough
		delay := 0.25 + 0.3*r.Float64()  // trough → lobe, ms
		lobeWidth := 0.15 + 0.25*r.Float64()
		const t0 = 0.4 // trough time within the template, ms
		w := int(math.Ceil(1.8e-3 * rate))
		shape := make([]float64, w)
		low := 0.0
		for k := range shape {
			t := float64(k) * 1e3 / rate
			trough := math.Exp(-0.5 * sq((t-t0)/width))
			rep := math.Exp(-0.5 * sq((t-t0-delay)/lobeWidth))
			shape[k] = -trough + lobe*rep
			low = min(low, shape[k])
		}
		u.template = make([]float32, w)
		for k, v := range shape {
			u.template[k] = float32(amp * v / -low) // trough = -amp
		}
		u.rate = 2 + 13*r.Float64()
		u.dead = max(int64(w), int64(math.Ceil(2e-3*rate)))
		u.rng = r
		u.prevStart = -1
		u.nextStart = u.dead/2 + int64(r.ExpFloat64()/u.rate*rate)
		u.nextScale = u.drawScale()
	}
}

func sq(x float64) float64 { return x * x }

// drawScale is a spike's amplitude relative to the template, ±10%.
func (u *unit) drawScale() float32 { return float32(0.9 + 0.2*u.rng.Float64()) }

// Info describes the stream.
func (s *Source) Info() pipeline.StreamInfo { return s.info }

// Realtime reports whether blocks are paced to the wall clock
// (drivers.Paced): when false the pipeline may make the source wait
// instead of dropping blocks.
func (s *Source) Realtime() bool { return s.cfg.Realtime }

// Start starts the clock that realtime pacing follows.
func (s *Source) Start() error {
	if err := s.clock.Start(); err != nil {
		return fmt.Errorf("sim: %w", err)
	}
	return nil
}

// Stop makes a pending ReadBlock, and every later one, return io.EOF.
func (s *Source) Stop() error {
	s.clock.Stop()
	return nil
}

// Close stops the source. It holds no device or file, so there is nothing
// else to release.
func (s *Source) Close() error {
	s.Stop()
	return nil
}

// ReadBlock fills b with the next b.Cap() samples. In realtime mode it
// returns when the wall clock reaches the end of the block (measured from
// Start), so reading never drifts. It returns io.EOF after Stop.
func (s *Source) ReadBlock(b *pipeline.Block) error {
	if s.clock.Stopped() {
		return io.EOF
	}
	if !s.clock.Started() {
		return errors.New("sim: ReadBlock before Start")
	}
	if b.Channels != s.nch {
		return fmt.Errorf("sim: block has %d channels, the source has %d", b.Channels, s.nch)
	}
	n := b.Cap()
	if s.cfg.limit > 0 {
		if s.next >= s.cfg.limit {
			return io.EOF
		}
		if left := s.cfg.limit - s.next; left < int64(n) {
			n = int(left)
		}
	}
	b.Samples = n
	b.FirstSample = s.next
	s.generate(b.Data[:s.nch*n], b.Digital[:n], s.next, n)
	s.next += int64(n)
	if s.cfg.Realtime {
		return s.clock.WaitUntil(s.next)
	}
	return nil
}

// generate writes n samples from sample number first into data (channel
// major, stride n) and digital.
func (s *Source) generate(data []float32, digital []uint64, first int64, n int) {
	if cap(s.l1) < n {
		s.l1 = make([]float32, n)
		s.l2 = make([]float32, n)
		s.lfpK = make([]float32, lfpPhases*n)
	}
	l1, l2 := s.l1[:n], s.l2[:n]
	lfpOn := s.cfg.LFPUV > 0
	if lfpOn {
		s.lfp(l1, l2, first)
		for k := range lfpPhases {
			mixPhase(s.lfpK[k*n:(k+1)*n], l1, l2, s.phCos[k], s.phSin[k])
		}
	}

	for c := 0; c < s.nch; c++ {
		dst := data[c*n : c*n+n]
		g := s.gain[c]
		lfp := s.lfpK[s.phase[c]*n : (s.phase[c]+1)*n]
		for i := 0; i < n; {
			sn := first + int64(i)
			chunk := sn / chunkLen
			within := int(sn - chunk*chunkLen)
			seg := min(n-i, chunkLen-within)
			off := s.noiseOffset(chunk, c) + within
			src := s.noise[off : off+seg]
			d := dst[i : i+seg]
			if lfpOn {
				addLFP(d, src, lfp[i:i+seg], g)
			} else {
				copy(d, src)
			}
			i += seg
		}
	}

	for i := range s.units {
		s.addSpikes(&s.units[i], data, first, n)
	}
	s.addPlanted(data, first, n)
	s.digital(digital, first)
}

// mixPhase sets d = a·l1 + b·l2.
func mixPhase(d, l1, l2 []float32, a, b float32) {
	l1 = l1[:len(d)]
	l2 = l2[:len(d)]
	for k := range d {
		d[k] = a*l1[k] + b*l2[k]
	}
}

// addLFP sets d = noise + g·lfp.
func addLFP(d, noise, lfp []float32, g float32) {
	noise = noise[:len(d)]
	lfp = lfp[:len(d)]
	k := 0
	for ; k+4 <= len(d); k += 4 {
		dd := d[k : k+4 : k+4]
		nn := noise[k : k+4 : k+4]
		ll := lfp[k : k+4 : k+4]
		dd[0] = nn[0] + g*ll[0]
		dd[1] = nn[1] + g*ll[1]
		dd[2] = nn[2] + g*ll[2]
		dd[3] = nn[3] + g*ll[3]
	}
	for ; k < len(d); k++ {
		d[k] = noise[k] + g*lfp[k]
	}
}

// noiseOffset is the noise-table offset of channel c in chunk k.
func (s *Source) noiseOffset(k int64, c int) int {
	h := mix(uint64(s.cfg.Seed)*0x9e3779b97f4a7c15 ^ uint64(k)*0xc2b2ae3d27d4eb4f ^ uint64(c)*0x165667b19e3779f9)
	return int(h % uint64(noiseTableLen-chunkLen))
}

// mix is the splitmix64 finaliser.
func mix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ x>>30) * 0xbf58476d1ce4e5b9
	x = (x ^ x>>27) * 0x94d049bb133111eb
	return x ^ x>>31
}

// lfp fills the in-phase (l1) and quadrature (l2) LFP components, in units
// of lfp_uv, for n samples from sample number first: 8 Hz theta whose
// amplitude waxes and wanes at 1 Hz, 40 Hz gamma strongest at the theta
// peak, and 3 Hz delta. cos φ·l1 + sin φ·l2 is the field at phase φ.
func (s *Source) lfp(l1, l2 []float32, first int64) {
	rate := s.rate
	quarter := rate / 4
	sin := s.sin
	at := func(f, k int64) float32 { return sin[(f*k)%rate] }
	cos := func(f, k int64) float32 { return sin[(f*k+quarter)%rate] }
	k := first % rate
	for i := range l1 {
		mod := 1 + 0.25*at(1, k)
		st, ct := at(8, k), cos(8, k)
		theta, thetaQ := 0.6*mod*st, 0.6*mod*ct
		g := 0.08 * (1 + st)
		gamma, gammaQ := g*at(40, k), g*cos(40, k)
		delta, deltaQ := 0.3*at(3, k), 0.3*cos(3, k)
		l1[i] = theta + gamma + delta
		l2[i] = thetaQ + gammaQ + deltaQ
		k++
		if k == rate {
			k = 0
		}
	}
}

// addSpikes adds the unit's spikes that overlap samples first..first+n-1.
func (s *Source) addSpikes(u *unit, data []float32, first int64, n int) {
	end := first + int64(n)
	w := int64(len(u.template))
	if u.prevStart >= 0 && u.prevStart+w > first {
		u.render(data, first, n, u.prevStart, u.prevScale)
	}
	for u.nextStart < end {
		u.render(data, first, n, u.nextStart, u.nextScale)
		u.prevStart, u.prevScale = u.nextStart, u.nextScale
		isi := u.dead + int64(u.rng.ExpFloat64()/u.rate*float64(s.rate))
		u.nextStart += isi
		u.nextScale = u.drawScale()
	}
}

// render adds one spike starting at sample number at.
func (u *unit) render(data []float32, first int64, n int, at int64, scale float32) {
	from := max(at, first)
	to := min(at+int64(len(u.template)), first+int64(n))
	if from >= to {
		return
	}
	tpl := u.template[from-at : to-at]
	for c := u.lo; c < u.hi; c++ {
		g := scale * u.gain[c-u.lo]
		d := data[c*n+int(from-first) : c*n+int(to-first)]
		d = d[:len(tpl)]
		for k, v := range tpl {
			d[k] += g * v
		}
	}
}

// digital fills the input words: line 0 is high during the first half of
// every second, line 1 carries 2–5 pulses of 5–10 ms per second at
// pseudo-random times that depend only on the seed and the second.
func (s *Source) digital(words []uint64, first int64) {
	half := s.rate / 2
	sec := first / s.rate
	pos := first - sec*s.rate
	s.pulses(sec)
	for i := range words {
		var w uint64
		if pos < half {
			w = 1
		}
		for p := 0; p < s.pulseN; p++ {
			if pos >= s.pulseStart[p] && pos < s.pulseEnd[p] {
				w |= 2
			}
		}
		words[i] = w
		pos++
		if pos == s.rate {
			pos = 0
			sec++
			s.pulses(sec)
		}
	}
}

// pulses computes (once) the line-1 pulses of second sec.
func (s *Source) pulses(sec int64) {
	if sec == s.pulseSec {
		return
	}
	s.pulseSec = sec
	h := mix(uint64(s.cfg.Seed)*0xd6e8feb86659fd93 ^ uint64(sec)*0x9e3779b97f4a7c15 ^ 0x74746c)
	s.pulseN = 2 + int(h%4)
	slot := s.rate / int64(s.pulseN)
	for p := 0; p < s.pulseN; p++ {
		h = mix(h)
		length := s.rate * int64(5+h%6) / 1000
		start := int64(p)*slot + int64((h>>16)%uint64(slot-length))
		s.pulseStart[p] = start
		s.pulseEnd[p] = start + length
	}
}
