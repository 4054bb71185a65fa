package pipeline

import "time"

// histMids are the midpoints of the buckets (histValue), computed once.
var histMids = func() (m [histBuckets]time.Duration) {
	for i := range m {
		m[i] = histValue(i)
	}
	return m
}()

// Snapshot returns, for each of the ascending bounds, how many recorded
// durations were at most that bound (cumulative counts, as Prometheus
// histogram buckets count them), with the sum and number of all recorded
// durations. counts has len(bounds) entries; the +Inf bucket is n.
//
// A bound that falls inside one of the histogram's own buckets (about 3%
// wide) counts that bucket's durations when the bucket's midpoint is at most
// the bound, so counts are exact to within that bucket width. Snapshot holds
// the histogram's lock for one pass over its buckets (a couple of microseconds)
// and allocates only counts.
func (h *Histogram) Snapshot(bounds []time.Duration) (counts []uint64, sum time.Duration, n uint64) {
	counts = make([]uint64, len(bounds))
	h.mu.Lock()
	defer h.mu.Unlock()
	var seen uint64
	b := 0
	for i := range h.counts {
		mid := histMids[i]
		for b < len(bounds) && mid > bounds[b] {
			counts[b] = seen
			b++
		}
		if b == len(bounds) {
			break
		}
		seen += h.counts[i]
	}
	for ; b < len(bounds); b++ {
		counts[b] = seen
	}
	return counts, h.sum, h.n
}
