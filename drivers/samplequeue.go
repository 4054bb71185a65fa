package drivers

import (
	"io"
	"sync"
	"sync/atomic"

	"github.com/ephysd/ephysd/pipeline"
)

// SampleQueue passes samples from a serial device's reader goroutine to
// ReadBlock. It holds a fixed number of samples; when ReadBlock falls behind
// and the queue is full, new samples are dropped and counted — a gap in
// sample numbers, never filled in. The reader pushes with the queue locked
// (Lock, Push…, Unlock, Wake), so a parser can emit samples straight into it
// and the lock can guard the parser too.
type SampleQueue struct {
	sync.Mutex

	nch, slots  int
	vals        []float32 // slots × nch
	sn          []int64
	dig         []uint64
	head, count int
	overflow    uint64
	err         error

	notify   chan struct{}
	stop     chan struct{}
	stopOnce sync.Once
	stopped  atomic.Bool
}

// NewSampleQueue makes a queue of slots samples of channels values each.
func NewSampleQueue(channels, slots int) *SampleQueue {
	return &SampleQueue{
		nch: channels, slots: slots,
		vals:   make([]float32, channels*slots),
		sn:     make([]int64, slots),
		dig:    make([]uint64, slots),
		notify: make(chan struct{}, 1),
		stop:   make(chan struct{}),
	}
}

// Push adds one sample: its sample number, channels values and digital
// word. The queue must be locked.
func (q *SampleQueue) Push(sn int64, v []float32, digital uint64) {
	if q.count == q.slots {
		q.overflow++
		return
	}
	slot := q.head + q.count
	if slot >= q.slots {
		slot -= q.slots
	}
	copy(q.vals[slot*q.nch:(slot+1)*q.nch], v)
	q.sn[slot] = sn
	q.dig[slot] = digital
	q.count++
}

// Overflow is the number of samples dropped because the queue was full.
// The queue must be locked.
func (q *SampleQueue) Overflow() uint64 { return q.overflow }

// Wake tells a waiting ReadBlock that samples arrived. Call it unlocked.
func (q *SampleQueue) Wake() {
	select {
	case q.notify <- struct{}{}:
	default:
	}
}

// Fail records the error that ReadBlock returns once the samples queued
// before it have been read (the device went away). Call it unlocked.
func (q *SampleQueue) Fail(err error) {
	q.Lock()
	if q.err == nil {
		q.err = err
	}
	q.Unlock()
	q.Wake()
}

// Stop makes a pending ReadBlock, and every later one, return io.EOF.
func (q *SampleQueue) Stop() {
	q.stopOnce.Do(func() {
		q.stopped.Store(true)
		close(q.stop)
	})
}

// Stopped reports whether Stop was called.
func (q *SampleQueue) Stopped() bool { return q.stopped.Load() }

// ReadBlock waits for at least one sample and fills b with up to b.Cap()
// consecutive samples; a jump in sample numbers (lost packets) ends the
// block, so the next one starts at the later sample number.
func (q *SampleQueue) ReadBlock(b *pipeline.Block) error {
	for {
		if q.stopped.Load() {
			return io.EOF
		}
		q.Lock()
		if q.count > 0 {
			q.fill(b)
			q.Unlock()
			return nil
		}
		err := q.err
		q.Unlock()
		if err != nil {
			return err
		}
		select {
		case <-q.notify:
		case <-q.stop:
			return io.EOF
		}
	}
}

// fill copies samples into b (locked, count > 0), channel-major with a
// stride of b.Cap(), then truncates b to the samples copied.
func (q *SampleQueue) fill(b *pipeline.Block) {
	capN := b.Cap()
	b.Samples = capN
	first := q.sn[q.head]
	b.FirstSample = first
	n := 0
	for n < capN && q.count > 0 && q.sn[q.head] == first+int64(n) {
		row := q.vals[q.head*q.nch : (q.head+1)*q.nch]
		for c, v := range row {
			b.Data[c*capN+n] = v
		}
		b.Digital[n] = q.dig[q.head]
		n++
		q.count--
		if q.head++; q.head == q.slots {
			q.head = 0
		}
	}
	b.Truncate(n)
}
