package drivers

// LinkStats count the damage a device's byte stream suffered on its way to
// ephysd, as the driver's parser saw it: garbage, truncated frames, frames
// whose checksum, sync or stop byte is wrong. The samples lost with them
// are not counted here: they show as gaps in sample numbers.
type LinkStats struct {
	// DiscardedBytes belonged to no good frame: they were dropped while the
	// parser looked for the next one.
	DiscardedBytes uint64 `json:"discarded_bytes"`
	// Resyncs is the number of times the parser lost the frame boundary
	// and had to find the next good frame: one for each stretch of
	// discarded bytes between two good frames (a garbage burst, a damaged
	// or truncated frame, or several of them back to back).
	Resyncs uint64 `json:"resyncs"`
}

// Add returns the sum of s and o.
func (s LinkStats) Add(o LinkStats) LinkStats {
	return LinkStats{DiscardedBytes: s.DiscardedBytes + o.DiscardedBytes, Resyncs: s.Resyncs + o.Resyncs}
}

// LinkCounter is implemented by sources, sinks and inputs whose device
// speaks a framed byte protocol: LinkStats reports what the parser has
// thrown away since the device was opened. It may be called from any
// goroutine, also after Close.
type LinkCounter interface {
	LinkStats() LinkStats
}

// linkOf returns x's link counts, or zero when x does not count them.
func linkOf(x any) LinkStats {
	if c, ok := x.(LinkCounter); ok {
		return c.LinkStats()
	}
	return LinkStats{}
}
