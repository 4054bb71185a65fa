package pipeline

import (
	"math"
	"math/bits"
	"sync"
	"time"
)

// Histogram records durations in logarithmic buckets (about 3% wide) from
// 1 ns to ~ 9 s, plus the exact maximum. Record does not allocate.
type Histogram struct {
	mu     sync.Mutex
	counts [histBuckets]uint64
	n      uint64
	max    time.Duration
	sum    time.Duration
}

const (
	histSub     = 32 // buckets per power of two
	histBuckets = 34 * histSub
)

func histBucket(d time.Duration) int {
	if d < 1 {
		return 0
	}
	v := uint64(d)
	e := 63 - bits.LeadingZeros64(v) // floor(log2 v)
	var frac uint64
	if e >= 5 {
		frac = (v >> uint(e-5)) & (histSub - 1)
	} else {
		frac = (v << uint(5-e)) & (histSub - 1)
	}
	i := e*histSub + int(frac)
	if i >= histBuckets {
		i = histBuckets - 1
	}
	return i
}

func histValue(i int) time.Duration {
	e := i / histSub
	frac := i % histSub
	lo := math.Ldexp(1+float64(frac)/histSub, e)
	hi := math.Ldexp(1+float64(frac+1)/histSub, e)
	return time.Duration((lo + hi) / 2)
}

// Record adds one duration.
func (h *Histogram) Record(d time.Duration) {
	h.mu.Lock()
	h.counts[histBucket(d)]++
	h.n++
	h.sum += d
	if d > h.max {
		h.max = d
	}
	h.mu.Unlock()
}

// Count is the number of recorded durations.
func (h *Histogram) Count() uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.n
}

// Max is the longest recorded duration.
func (h *Histogram) Max() time.Duration {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.max
}

// Mean is the average duration.
func (h *Histogram) Mean() time.Duration {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.n == 0 {
		return 0
	}
	return h.sum / time.Duration(h.n)
}

// Quantile returns the q-quantile (0 < q ≤ 1), to bucket precision, never
// more than the maximum.
func (h *Histogram) Quantile(q float64) time.Duration {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.n == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(h.n)))
	if rank < 1 {
		rank = 1
	}
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			v := histValue(i)
			if v > h.max {
				v = h.max
			}
			return v
		}
	}
	return h.max
}

// Reset forgets everything recorded.
func (h *Histogram) Reset() {
	h.mu.Lock()
	h.counts = [histBuckets]uint64{}
	h.n, h.max, h.sum = 0, 0, 0
	h.mu.Unlock()
}
