package pipeline

import (
	"sync"
	"testing"
	"time"
)

// abandoningExecutor runs the stage loop on a goroutine and keeps the
// abandon callback, as the Python runtime does for its interpreter thread.
type abandoningExecutor struct {
	mu      sync.Mutex
	abandon func()
}

func (e *abandoningExecutor) Execute(loop func(tasks <-chan func())) { go loop(nil) }

func (e *abandoningExecutor) ExecuteAbandonable(loop func(tasks <-chan func()), abandon func()) {
	e.mu.Lock()
	e.abandon = abandon
	e.mu.Unlock()
	go loop(nil)
}

// stuckStage blocks in Process on the block starting at sample `at` until
// released, counting its calls and hooks.
type stuckStage struct {
	at      int64
	entered chan struct{}
	release chan struct{}

	mu                    sync.Mutex
	calls, starts, stops  int
	afterRelease          int // calls that came in after the stuck one returned
	released, stuckReturn bool
}

func (s *stuckStage) Name() string { return "stuck" }

func (s *stuckStage) Process(b *Block) error {
	s.mu.Lock()
	s.calls++
	if s.stuckReturn {
		s.afterRelease++
	}
	s.mu.Unlock()
	if b.FirstSample == s.at {
		close(s.entered)
		<-s.release
		s.mu.Lock()
		s.stuckReturn = true
		s.mu.Unlock()
	}
	b.Data[0] += 1
	return nil
}

func (s *stuckStage) StartAcquisition() error { s.mu.Lock(); s.starts++; s.mu.Unlock(); return nil }
func (s *stuckStage) StopAcquisition() error  { s.mu.Lock(); s.stops++; s.mu.Unlock(); return nil }

// When the executor gives up the stage thread, stuck in a stage, the runner
// goes on from another goroutine: every later block reaches the consumer
// in order, the stuck block is counted as an overrun and never consumed,
// the hooks run once each, and when the stuck call returns at last, the
// loop it returns to leaves the run alone.
func TestRunnerContinuesWhenStageThreadIsAbandoned(t *testing.T) {
	for _, inline := range []bool{false, true} {
		p, _ := NewPool(PoolSizeFor(4, false), 1, 10)
		st := &stuckStage{at: 30, entered: make(chan struct{}), release: make(chan struct{})}
		ex := &abandoningExecutor{}
		var mu sync.Mutex
		var firsts []int64
		var values []float32
		cons := consumerFunc(func(b *Block) error {
			mu.Lock()
			firsts = append(firsts, b.FirstSample)
			values = append(values, b.Data[0])
			mu.Unlock()
			return nil
		})
		r, err := NewRunner(RunnerConfig{Source: &counter{blocks: 20}, Pool: p, QueueDepth: 4, Backpressure: true,
			Inline: inline, Stages: []Stage{st}, Consumers: []Consumer{cons}, Executor: ex})
		if err != nil {
			t.Fatal(err)
		}
		if err := r.Start(); err != nil {
			t.Fatal(err)
		}
		select {
		case <-st.entered:
		case <-time.After(time.Minute):
			t.Fatal("the stage was never called on the block")
		}
		ex.mu.Lock()
		abandon := ex.abandon
		ex.mu.Unlock()
		abandon()
		select {
		case <-r.Done():
		case <-time.After(time.Minute):
			t.Fatalf("inline %v: the run did not end after the takeover: %+v", inline, r.Stats())
		}
		close(st.release) // the stuck call returns, to a loop that has been replaced
		time.Sleep(50 * time.Millisecond)
		stats := r.Stats()
		st.mu.Lock()
		calls, starts, stops, after := st.calls, st.starts, st.stops, st.afterRelease
		st.mu.Unlock()
		if stats.OverrunBlocks != 1 || stats.OverrunSamples != 10 || stats.Processed != 19 || len(firsts) != 19 {
			t.Fatalf("inline %v: stats %+v, %d consumed", inline, stats, len(firsts))
		}
		for i, f := range firsts {
			want := int64(i) * 10
			if i >= 3 {
				want += 10
			}
			if f != want || values[i] != float32(f)+1 {
				t.Fatalf("inline %v: block %d starts at %d (want %d), value %v", inline, i, f, want, values[i])
			}
		}
		if calls != 20 || starts != 1 || stops != 1 || after != 0 {
			t.Fatalf("inline %v: %d calls, %d starts, %d stops, %d calls after the stuck one returned", inline, calls, starts, stops, after)
		}
		p.Close(true) // the stuck block stays out of the pool
	}
}
