package pipeline

import "math/bits"

// EventKind tells what an Event carries.
type EventKind uint8

const (
	// EventTTL is a change of one digital line: a source's input line, or a
	// line set by a Python stage's add_python_event.
	EventTTL EventKind = iota
	// EventMessage is a text message (Open Ephys MessageCenter).
	EventMessage
)

// Event is something that happened at one sample number.
type Event struct {
	Kind EventKind
	// Processor is the id of the processor that made the event: the
	// source's id for its TTL inputs, a stage's id for its events, or
	// MessageCenterID for messages.
	Processor    int
	Line         uint8 // 0–63 for TTL events
	State        bool  // true = rising / high
	SampleNumber int64
	FullWord     uint64 // all lines of this processor after the event
	Text         string // EventMessage only
}

// MessageCenterID is the processor id of text messages.
const MessageCenterID = 0

// Spike is one detected spike: a waveform snippet on the channels of one
// electrode. It is in the block that holds the last sample of its waveform
// (the first block in which it is complete, so that stages see it before
// that block's samples); its peak, SampleNumber, may lie in an earlier
// block.
//
// Waveform memory belongs to the block, like its samples: nobody keeps it
// after the block is released, and whoever appends a spike may reuse a
// Waveform buffer left in the spare capacity of b.Spikes by an earlier use
// of the same pooled block (that is how the spike detector allocates
// nothing per block).
type Spike struct {
	Processor      int
	Electrode      string
	ElectrodeIndex int // the electrode's position among the detector's electrodes, from 0
	SampleNumber   int64
	SortedID       int
	Channels       int
	Samples        int
	Waveform       []float32 // Channels × Samples, channel-major, µV
}

// AppendEdges appends one TTL event for every line that changes in words,
// compared with the line state before words[0] (prev). words[i] is the state
// at sample number first+i. It returns the events and the state after the
// last word. Events are in sample order, and in line order within a sample.
func AppendEdges(events []Event, processor int, prev uint64, words []uint64, first int64) ([]Event, uint64) {
	for i, w := range words {
		changed := w ^ prev
		for changed != 0 {
			line := bits.TrailingZeros64(changed)
			changed &= changed - 1
			events = append(events, Event{
				Kind:         EventTTL,
				Processor:    processor,
				Line:         uint8(line),
				State:        w&(1<<uint(line)) != 0,
				SampleNumber: first + int64(i),
				FullWord:     w,
			})
		}
		prev = w
	}
	return events, prev
}
