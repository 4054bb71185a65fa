package drivers

import (
	"errors"
	"io"
	"testing"
	"time"

	"github.com/ephysd/ephysd/pipeline"
)

func TestSampleQueueGapsOverflowFailStop(t *testing.T) {
	q := NewSampleQueue(2, 4)
	p, _ := pipeline.NewPool(1, 2, 8)
	defer p.Close(false)
	b := p.TryGet()
	defer b.Release()
	q.Lock()
	for _, sn := range []int64{10, 11, 14, 15, 16} { // a gap after 11; 16 overflows the 4 slots
		q.Push(sn, []float32{float32(sn), -float32(sn)}, uint64(sn))
	}
	over := q.Overflow()
	q.Unlock()
	q.Wake()
	if over != 1 {
		t.Fatalf("overflow %d, want 1", over)
	}
	if err := q.ReadBlock(b); err != nil || b.FirstSample != 10 || b.Samples != 2 || b.Channel(1)[1] != -11 || b.Digital[1] != 11 {
		t.Fatalf("first block: %v %d %d %v", err, b.FirstSample, b.Samples, b.Channel(1))
	}
	q.Fail(errors.New("device disconnected"))
	if err := q.ReadBlock(b); err != nil || b.FirstSample != 14 || b.Samples != 2 || b.Channel(0)[1] != 15 {
		t.Fatalf("queued samples before the error: %v %d %d", err, b.FirstSample, b.Samples)
	}
	if err := q.ReadBlock(b); err == nil || err.Error() != "device disconnected" {
		t.Fatalf("after the queued samples: %v", err)
	}
	q2 := NewSampleQueue(1, 4)
	done := make(chan error)
	go func() { done <- q2.ReadBlock(b) }()
	time.Sleep(10 * time.Millisecond)
	q2.Stop()
	if err := <-done; !errors.Is(err, io.EOF) {
		t.Fatalf("stop: %v", err)
	}
}
