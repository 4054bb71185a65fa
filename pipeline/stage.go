package pipeline

// Stage transforms blocks in place, in a fixed order, on the stage thread
// (the Python interpreter's thread when Python stages are present). A stage
// may add events to the block. An error is counted and logged by the runner
// and the block goes on to the next stage: a stage must leave a block it
// failed on as it found it.
type Stage interface {
	Name() string
	Process(b *Block) error
}

// AcquisitionHooks is implemented by stages that want to know when the
// stream starts and stops. StartAcquisition runs before the first block,
// StopAcquisition after the last.
type AcquisitionHooks interface {
	StartAcquisition() error
	StopAcquisition() error
}

// RecordingHooks is implemented by stages that want to know when recording
// starts and stops. StartRecording runs before the first recorded block is
// processed, StopRecording before the first block that is not recorded (or
// at the end of the stream).
type RecordingHooks interface {
	StartRecording(r *Recording) error
	StopRecording() error
}

// Consumer receives every processed block, in order, on its own goroutine
// (a recorder). It must not keep the block after Consume returns. End is
// called once after the last block; its error is the runner's result.
type Consumer interface {
	Consume(b *Block) error
	End() error
}

// EventSink receives the events of each processed block on the stage
// thread, right after the last stage: TTL outputs driven by closed-loop
// scripts sit here. It must not block for long.
type EventSink interface {
	HandleEvents(b *Block) error
}

// Reader is what the runner needs of a source: fill the block with the next
// samples. It sets Samples (1..Cap), FirstSample, Data and Digital, and may
// append events (messages). A sample-number jump from the previous block is
// a gap the source saw (lost packets). It returns io.EOF at the end of a
// finite source.
type Reader interface {
	ReadBlock(b *Block) error
}

// Executor runs the stage loop. The default runs it on a new goroutine; the
// Python runtime runs it on the interpreter's pinned thread, passing the
// channel of other work for that thread, which the loop serves between
// blocks.
type Executor interface {
	Execute(loop func(tasks <-chan func()))
}

type goExecutor struct{}

func (goExecutor) Execute(loop func(tasks <-chan func())) { go loop(nil) }
