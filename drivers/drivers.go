// Package drivers defines what a device family provides to ephysd — a
// Source of sample blocks, a Sink for TTL outputs — and a registry of the
// families by name. Each family lives in its own subpackage and registers
// itself in an init function.
package drivers

import (
	"fmt"
	"sort"
	"sync"

	"github.com/ephysd/ephysd/pipeline"
)

// Source is a device (or a simulation, or a recording) that produces blocks.
//
// ReadBlock (from pipeline.Reader) fills up to b.Cap() samples and sets
// b.FirstSample; a jump in sample numbers is a gap the device reported
// (lost packets), never filled in. Start is called once before the first
// ReadBlock, Stop makes a pending and every later ReadBlock return (io.EOF),
// Close releases the device.
type Source interface {
	pipeline.Reader
	Info() pipeline.StreamInfo
	Start() error
	Stop() error
	Close() error
}

// Sink drives outputs (TTL lines) from the events of processed blocks. It
// is called on the stage thread right after the last stage, so it must
// return quickly.
type Sink interface {
	pipeline.EventSink
	Close() error
}

// SourceConfig is one driver's configuration block, decoded from the
// [source.<name>] table of the configuration file. Open makes the source.
type SourceConfig interface {
	Open() (Source, error)
}

var (
	mu      sync.Mutex
	sources = map[string]func() SourceConfig{}
)

// RegisterSource makes a source driver known under name. newConfig returns
// a pointer to the driver's configuration struct filled with its defaults.
func RegisterSource(name string, newConfig func() SourceConfig) {
	mu.Lock()
	defer mu.Unlock()
	if _, dup := sources[name]; dup {
		panic("drivers: source " + name + " registered twice")
	}
	sources[name] = newConfig
}

// SourceNames lists the registered source drivers, sorted.
func SourceNames() []string {
	mu.Lock()
	defer mu.Unlock()
	names := make([]string, 0, len(sources))
	for n := range sources {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// NewSourceConfig returns the default configuration of the named driver.
func NewSourceConfig(name string) (SourceConfig, error) {
	mu.Lock()
	f, ok := sources[name]
	mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("unknown source driver %q (known: %v)", name, SourceNames())
	}
	return f(), nil
}

// Paced is implemented by sources that can run either paced to the wall
// clock (a live device, a real-time simulation) or as fast as the pipeline
// takes blocks (a recording replayed for testing). A source that does not
// implement it is live. The runner drops blocks (overruns) only for live
// sources; for the others it waits.
type Paced interface {
	Realtime() bool
}
