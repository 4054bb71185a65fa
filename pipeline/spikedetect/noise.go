package spikedetect

import "math"

// noiseSamples is how many values of each channel the noise estimate
// looks at: the first noiseSamples samples of the stream (a quick first
// estimate), then a subsample spread evenly over the noise window.
const noiseSamples = 1024

// madToSigma converts the median absolute value of zero-mean Gaussian noise
// to its standard deviation: σ̂ = median(|x|) / 0.6745.
const madToSigma = 1 / 0.6745

// noise estimates each used channel's noise σ̂ from a ring of subsampled
// values of the detector's signal. Which samples enter the ring depends
// only on their sample numbers, never on how the stream is cut into
// blocks.
type noise struct {
	stride int64     // subsample every stride-th sample once the rings are full
	update int64     // samples between two estimates of a channel
	ring   []float32 // channel-major, noiseSamples per channel
	count  int       // values in every channel's ring (≤ noiseSamples)
	pos    int       // next write position in every ring
	sigma  []float32 // current σ̂, 0 until the first estimate
	at     []int64   // sample number of each channel's last estimate
	cursor int       // round-robin position of the estimate scheduler
	// nextCheck is the first sample number at which an estimate may be
	// due, so that most blocks skip the scheduler.
	nextCheck int64
	scratch   []float32
}

func newNoise(channels int, rate, windowS, updateS float64) noise {
	return noise{
		stride:  max(1, int64(math.Round(windowS*rate/noiseSamples))),
		update:  max(1, int64(math.Round(updateS*rate))),
		ring:    make([]float32, channels*noiseSamples),
		sigma:   make([]float32, channels),
		at:      make([]int64, channels),
		scratch: make([]float32, noiseSamples),
	}
}

func (n *noise) reset() {
	n.count, n.pos = 0, 0
	clear(n.sigma)
	clear(n.at)
	n.cursor = 0
	n.nextCheck = 0
}

// add takes a block: samples first..first+len−1, channel l's values given
// by at(l, i) for i from 0.
func (n *noise) add(first int64, samples int, at func(l, i int) float32) {
	channels := len(n.sigma)
	i := 0
	// The quick first estimate: every sample until the rings are full.
	if n.count < noiseSamples {
		take := min(samples, noiseSamples-n.count)
		for l := 0; l < channels; l++ {
			ring := n.ring[l*noiseSamples : (l+1)*noiseSamples]
			for k := 0; k < take; k++ {
				ring[n.pos+k] = at(l, k)
			}
		}
		n.count += take
		n.pos = (n.pos + take) % noiseSamples
		i = take
	}
	// Then every stride-th sample number.
	s := first + int64(i)
	if r := s % n.stride; r != 0 {
		s += n.stride - r
	}
	for ; s < first+int64(samples); s += n.stride {
		k := int(s - first)
		for l := 0; l < channels; l++ {
			n.ring[l*noiseSamples+n.pos] = at(l, k)
		}
		n.pos = (n.pos + 1) % noiseSamples
	}
}

// estimate renews the estimates that are due at sample number now (the
// last sample of a block of samples samples): a channel whose ring has
// just filled, or whose estimate is older than the update interval. At
// most budget channels per block, in round-robin order, so that the cost
// is spread over the blocks instead of landing on one. It returns whether
// any estimate changed.
func (n *noise) estimate(now int64, samples int) bool {
	if now < n.nextCheck {
		return false
	}
	channels := len(n.sigma)
	budget := max(4, int((2*int64(channels)*int64(samples)+n.update-1)/n.update))
	changed := false
	next := int64(math.MaxInt64)
	for tried := 0; tried < channels; tried++ {
		ch := n.cursor
		if n.count < noiseSamples {
			next = min(next, now+int64(noiseSamples-n.count))
		} else if n.sigma[ch] != 0 && now-n.at[ch] < n.update {
			next = min(next, n.at[ch]+n.update)
		} else if budget == 0 {
			next = now // more are due: go on at the next block
			break
		} else {
			n.sigma[ch] = n.medianAbs(ch) * madToSigma
			if n.sigma[ch] == 0 {
				// A flat channel: no crossings from noise, but not
				// "no estimate" either.
				n.sigma[ch] = math.SmallestNonzeroFloat32
			}
			n.at[ch] = now
			next = min(next, now+n.update)
			budget--
			changed = true
		}
		n.cursor++
		if n.cursor == channels {
			n.cursor = 0
		}
	}
	n.nextCheck = next
	return changed
}

// medianAbs is the median of |x| over channel ch's ring (the upper median
// for an even count).
func (n *noise) medianAbs(ch int) float32 {
	s := n.scratch
	for i, v := range n.ring[ch*noiseSamples : (ch+1)*noiseSamples] {
		s[i] = float32(math.Abs(float64(v)))
	}
	return selectK(s, len(s)/2)
}

// selectK returns the k-th smallest value of s (0-based), reordering s
// (Hoare's selection with a median-of-three pivot; no allocation).
func selectK(s []float32, k int) float32 {
	lo, hi := 0, len(s)-1
	for hi > lo {
		mid := lo + (hi-lo)/2
		if s[mid] < s[lo] {
			s[mid], s[lo] = s[lo], s[mid]
		}
		if s[hi] < s[lo] {
			s[hi], s[lo] = s[lo], s[hi]
		}
		if s[hi] < s[mid] {
			s[hi], s[mid] = s[mid], s[hi]
		}
		p := s[mid]
		i, j := lo, hi
		for i <= j {
			for s[i] < p {
				i++
			}
			for s[j] > p {
				j--
			}
			if i <= j {
				s[i], s[j] = s[j], s[i]
				i++
				j--
			}
		}
		switch {
		case k <= j:
			hi = j
		case k >= i:
			lo = i
		default:
			return s[k]
		}
	}
	return s[k]
}
