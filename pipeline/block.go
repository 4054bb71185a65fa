// Package pipeline holds the data path's shared types: sample blocks, the
// fixed block pool, events, stages and the runner that moves blocks from a
// source through the stages to the consumers (recorders).
//
// Nothing here allocates per block in steady state: blocks come from a Pool,
// queues are buffered channels of pointers, and event slices are reused.
package pipeline

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"time"
)

// DefaultEventCapacity is the number of events a pooled block holds without
// growing its event slice. A block with more events still works; it allocates.
const DefaultEventCapacity = 256

// Block is one buffer of samples: Channels × Samples float32 values, the
// sample number of its first sample, one uint64 word of digital-input lines
// per sample, and the events that belong to it.
//
// Data is channel-major and C-contiguous for the current length: sample i of
// channel c is Data[c*Samples+i]. That is the memory layout of a numpy
// float32 array of shape (Channels, Samples), which is how Python stages see
// it, without a copy. Pooled block memory is pinned, so C code may hold a
// pointer to it for as long as the pool lives.
type Block struct {
	Channels    int
	Samples     int   // samples in this block, 1..Cap
	FirstSample int64 // sample number of the first sample
	Data        []float32
	Digital     []uint64 // Digital[i] holds the input lines of sample i (bit n = line n)
	Events      []Event
	Spikes      []Spike

	// Raw, when the runner is asked to keep the pre-stage stream, is a copy
	// of this block made before any stage ran. It goes back to the pool with
	// its owner.
	Raw *Block

	// ReadAt is when the source delivered the block (monotonic clock): the
	// runner measures the closed-loop latency from it.
	ReadAt time.Time

	// Recording is the recording this block belongs to, or nil when the
	// block is not recorded. Transitions between blocks mark recording
	// start and stop exactly at a block boundary.
	Recording *Recording

	cap  int
	pool *Pool
}

// Cap is the most samples the block can hold.
func (b *Block) Cap() int { return b.cap }

// Channel returns the samples of channel c for the current length.
func (b *Block) Channel(c int) []float32 {
	return b.Data[c*b.Samples : (c+1)*b.Samples]
}

// Reset empties the block for reuse: full length, no events, no raw copy.
func (b *Block) Reset() {
	b.Samples = b.cap
	b.FirstSample = 0
	b.Events = b.Events[:0]
	b.Spikes = b.Spikes[:0]
	b.Raw = nil
	b.Recording = nil
}

// Truncate shortens a block that was filled with a stride of Cap samples per
// channel (as packet-by-packet sources do) to n samples, moving each
// channel's samples so the layout is again contiguous for length n.
func (b *Block) Truncate(n int) {
	if n < 0 || n > b.cap {
		panic(fmt.Sprintf("pipeline: Truncate(%d) outside 0..%d", n, b.cap))
	}
	stride := b.Samples
	if n == stride {
		return
	}
	for c := 1; c < b.Channels; c++ {
		copy(b.Data[c*n:c*n+n], b.Data[c*stride:c*stride+n])
	}
	b.Samples = n
}

// CopyFrom makes b an exact copy of src's samples, digital words and
// position. Events are not copied.
func (b *Block) CopyFrom(src *Block) {
	b.Channels = src.Channels
	b.Samples = src.Samples
	b.FirstSample = src.FirstSample
	copy(b.Data, src.Data[:src.Channels*src.Samples])
	copy(b.Digital, src.Digital[:src.Samples])
	b.Recording = src.Recording
}

// Release returns the block (and its raw copy) to the pool it came from.
func (b *Block) Release() {
	if b.Raw != nil {
		b.Raw.Release()
		b.Raw = nil
	}
	if b.pool != nil {
		b.pool.put(b)
	}
}

// Recording identifies one recording (one record start … stop): the folder
// the recorder writes and the numbers Open Ephys gives it.
type Recording struct {
	Dir        string // the session folder (parent/<date>), as passed to start_recording
	Experiment int    // experimentN, from 1
	Number     int    // recordingM, from 1
}

// Pool is a fixed set of blocks of one shape. Get and Put do not allocate.
// Block memory is pinned for the pool's lifetime so that Python (C) may view
// it without copies.
type Pool struct {
	channels int
	samples  int
	free     chan *Block
	all      []*Block
	pinner   runtime.Pinner

	mu     sync.Mutex
	closed bool
}

// NewPool makes size blocks of channels × samples.
func NewPool(size, channels, samples int) (*Pool, error) {
	if size < 1 || channels < 1 || samples < 1 {
		return nil, fmt.Errorf("pipeline: pool of %d blocks of %d channels × %d samples: every number must be at least 1", size, channels, samples)
	}
	p := &Pool{channels: channels, samples: samples, free: make(chan *Block, size)}
	for i := 0; i < size; i++ {
		b := &Block{
			Channels: channels,
			Samples:  samples,
			Data:     make([]float32, channels*samples),
			Digital:  make([]uint64, samples),
			Events:   make([]Event, 0, DefaultEventCapacity),
			cap:      samples,
			pool:     p,
		}
		prefault(b.Data)
		p.pinner.Pin(&b.Data[0])
		p.all = append(p.all, b)
		p.free <- b
	}
	// A pool stays reachable until Close, so a forgotten Close leaks memory
	// instead of tripping the runtime's check on garbage-collected pins.
	livePools.Lock()
	livePools.set[p] = struct{}{}
	livePools.Unlock()
	return p, nil
}

// prefault writes one value in every page of data, so that the pool's
// memory is resident from the start: fresh memory from the kernel is
// mapped at its first write, and otherwise the first time a queue reached
// a new depth would page-fault in the hot path, and the resident size
// would creep up for hours as rarer load spikes reach deeper into the
// queues (which looks like a leak).
func prefault(data []float32) {
	const perPage = 4096 / 4
	for i := 0; i < len(data); i += perPage {
		data[i] = 0
	}
}

// Channels is the channel count of the pool's blocks.
func (p *Pool) Channels() int { return p.channels }

// BlockSamples is the capacity in samples of the pool's blocks.
func (p *Pool) BlockSamples() int { return p.samples }

// Size is the number of blocks in the pool.
func (p *Pool) Size() int { return len(p.all) }

// Free is the number of blocks currently in the pool.
func (p *Pool) Free() int { return len(p.free) }

// TryGet returns a reset block, or nil when every block is in use.
func (p *Pool) TryGet() *Block {
	select {
	case b := <-p.free:
		b.Reset()
		return b
	default:
		return nil
	}
}

// Get waits for a free block.
func (p *Pool) Get(ctx context.Context) (*Block, error) {
	select {
	case b := <-p.free:
		b.Reset()
		return b, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (p *Pool) put(b *Block) {
	select {
	case p.free <- b:
	default:
		panic("pipeline: block released twice")
	}
}

// ErrPoolInUse is returned by Close while blocks are still out of the pool.
var ErrPoolInUse = errors.New("pipeline: pool closed while blocks are in use")

// Close unpins the pool's memory. Pass keep=true when something outside Go
// (a Python script holding its data array) may still point into the blocks:
// the memory then stays pinned, and reachable, for the life of the process.
func (p *Pool) Close(keep bool) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil
	}
	p.closed = true
	if keep {
		return nil
	}
	livePools.Lock()
	delete(livePools.set, p)
	livePools.Unlock()
	p.pinner.Unpin()
	if len(p.free) != len(p.all) {
		return ErrPoolInUse
	}
	return nil
}

var livePools = struct {
	sync.Mutex
	set map[*Pool]struct{}
}{set: map[*Pool]struct{}{}}
