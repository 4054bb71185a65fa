package openbci

// Scale factors.
const (
	// VRef is the ADS1299 reference voltage in volts.
	VRef = 4.5
	// FullScaleCounts is 2^23 − 1, the largest positive int24.
	FullScaleCounts = 1<<23 - 1
	// AccelScale is g per accelerometer count (LIS3DH at ±4 g, as the
	// firmware configures it).
	AccelScale = 0.002 / 16
	// BitVoltsCounts is the number of ADC counts one int16 step of the
	// recording holds (see Config: 16 counts ≈ 0.358 µV at gain 24).
	BitVoltsCounts = 16
)

// MicrovoltsPerCount is the µV value of one ADC count at the given gain.
func MicrovoltsPerCount(gain int) float64 {
	return VRef / float64(gain) / FullScaleCounts * 1e6
}

// DecoderStats are the decoder's counters.
type DecoderStats struct {
	Packets        uint64 // packets decoded
	Samples        uint64 // samples emitted
	LostPackets    uint64 // packets missing by the sample counter
	LostSamples    uint64 // samples missing (Daisy: 16-channel samples, incl. half pairs)
	Gaps           uint64 // sample-number jumps
	Duplicates     uint64 // packets with the same counter as the one before, dropped
	HalfPairs      uint64 // Daisy: packets dropped because their pair partner was lost
	AccelUpdates   uint64 // C0 packets with a new accelerometer value
	OtherStopBytes uint64 // C1–C6 packets: aux bytes ignored, accelerometer held
}

// Decoder turns packets into samples: ADC counts to µV with each channel's
// gain, Daisy packet pairs into 16-channel samples, the accelerometer into g
// (held between updates), and the wrapping 8-bit counter into 64-bit sample
// numbers with gaps where packets were lost. It does no I/O.
//
// Sample numbers start at 0 at the first sample. A jump of the counter by d
// means d−1 lost packets; a run of 256 or more lost packets is seen modulo
// 256 (the counter cannot tell). A repeated counter value is taken as a
// duplicate and dropped.
type Decoder struct {
	daisy bool
	accel bool
	nch   int       // EEG channels: 8 or 16
	scale []float64 // µV per count, per EEG channel
	out   []float32 // the sample being built: EEG then AX, AY, AZ
	g     [3]float32

	started bool
	lastSN  uint8
	packet  int64 // unwrapped number of the last packet, from 0
	pending bool  // Daisy: the odd half is in out[0:8]
	pendPkt int64
	first   int64 // index of the first emitted sample (numbered 0)
	next    int64 // index expected next

	Stats DecoderStats
}

// NewDecoder makes a decoder for 8 (Cyton) or 16 (daisy) channels with the
// given per-channel gains, and the accelerometer channels when accel.
func NewDecoder(daisy, accel bool, gains []int) *Decoder {
	d := &Decoder{daisy: daisy, accel: accel, nch: 8}
	if daisy {
		d.nch = 16
	}
	d.scale = make([]float64, d.nch)
	for c := range d.scale {
		g := 24
		if c < len(gains) {
			g = gains[c]
		}
		d.scale[c] = MicrovoltsPerCount(g)
	}
	n := d.nch
	if accel {
		n += 3
	}
	d.out = make([]float32, n)
	return d
}

// Channels is the number of values in each emitted sample.
func (d *Decoder) Channels() int { return len(d.out) }

// Add decodes one packet and calls emit for each sample it completes, with
// the sample number and the values (valid only during the call).
func (d *Decoder) Add(p *Packet, emit func(sn int64, values []float32)) {
	d.Stats.Packets++
	if d.started {
		step := int64(p.SampleNumber - d.lastSN) // mod 256
		if step == 0 {
			d.Stats.Duplicates++
			return
		}
		if step > 1 {
			d.Stats.LostPackets += uint64(step - 1)
		}
		d.packet += step
	} else {
		d.started = true
	}
	d.lastSN = p.SampleNumber

	if p.Stop == StopByteMin {
		if x, y, z := be16(p.Aux[0:]), be16(p.Aux[2:]), be16(p.Aux[4:]); x != 0 || y != 0 || z != 0 {
			d.g = [3]float32{float32(float64(x) * AccelScale), float32(float64(y) * AccelScale), float32(float64(z) * AccelScale)}
			d.Stats.AccelUpdates++
		}
	} else {
		d.Stats.OtherStopBytes++
	}

	if !d.daisy {
		d.fill(0, p)
		d.emit(d.packet, emit)
		return
	}
	// Daisy: odd counter = channels 1–8, the next (even) = 9–16.
	if p.SampleNumber&1 == 1 {
		if d.pending {
			d.Stats.HalfPairs++ // its even partner never came
		}
		d.fill(0, p)
		d.pending = true
		d.pendPkt = d.packet
		return
	}
	if !d.pending || d.pendPkt != d.packet-1 {
		if d.pending {
			d.Stats.HalfPairs++
		}
		d.Stats.HalfPairs++
		d.pending = false
		return
	}
	d.pending = false
	d.fill(8, p)
	// Pairs are numbered by their odd packet: (odd >> 1) counts pairs.
	d.emit(d.pendPkt>>1, emit)
}

// emit numbers the sample from the first one emitted and counts gaps.
func (d *Decoder) emit(index int64, emit func(int64, []float32)) {
	if d.accel {
		copy(d.out[d.nch:], d.g[:])
	}
	if d.Stats.Samples == 0 {
		d.first = index
	} else if gap := index - d.next; gap > 0 {
		d.Stats.Gaps++
		d.Stats.LostSamples += uint64(gap)
	}
	d.next = index + 1
	d.Stats.Samples++
	emit(index-d.first, d.out)
}

func (d *Decoder) fill(off int, p *Packet) {
	for c := 0; c < 8; c++ {
		d.out[off+c] = float32(float64(p.Counts[c]) * d.scale[off+c])
	}
}

func be16(b []byte) int16 { return int16(uint16(b[0])<<8 | uint16(b[1])) }
