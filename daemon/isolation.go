package daemon

import (
	"time"

	"go.uber.org/zap"

	"github.com/ephysd/ephysd/pipeline"
	"github.com/ephysd/ephysd/pyrt"
	"github.com/ephysd/ephysd/pyrt/isolated"
)

// PythonStage is a Python stage as the daemon drives it: run in ephysd's
// own interpreter (*pyrt.Stage) or in a worker process of its own
// (*isolated.Stage, [[stage]] isolation = "process").
type PythonStage interface {
	pipeline.Stage
	ID() int
	Path() string
	Status() pyrt.StageStatus
	Reload() error
	SetModule(path string) error
	Reshape(channels int, rate float64) error
	SameModule(cfg pyrt.StageConfig) bool
	Retained() bool
}

var (
	_ PythonStage = (*pyrt.Stage)(nil)
	_ PythonStage = (*isolated.Stage)(nil)
)

// isolatedStage reports whether a stage runs in a worker process.
func isolatedStage(s PythonStage) bool {
	_, ok := s.(*isolated.Stage)
	return ok
}

// needsInterpreter reports whether some stage of cfg runs in ephysd's own
// interpreter (with every stage isolated, ephysd does not start Python).
func needsInterpreter(cfg *Config) bool {
	for _, sc := range cfg.Stages {
		if sc.Isolation != IsolationProcess {
			return true
		}
	}
	return false
}

// newIsolatedStage starts a stage in a worker process: this executable as
// `ephysd stage-worker`, with the [python] settings of cfg.
func newIsolatedStage(cfg *Config, want pyrt.StageConfig, blockSamples int, log *zap.Logger) (*isolated.Stage, error) {
	return isolated.NewStage(isolated.Config{
		Stage: want, Executable: cfg.Python.Executable, Venv: cfg.Python.Venv,
		SwitchInterval: time.Duration(cfg.Python.SwitchIntervalUS * float64(time.Microsecond)),
		BlockTimeout:   blockTimeout(cfg.Python.BlockTimeoutMS),
		BlockSamples:   blockSamples,
		Command:        workerCommand,
		Log:            log,
	})
}

// closeStage stops the worker of an isolated stage that is no longer used
// (an in-process stage has nothing to stop).
func closeStage(s PythonStage) {
	if c, ok := s.(interface{ Close() error }); ok {
		c.Close()
	}
}

// registerEventChannels gives the isolated stages, whose interpreters are
// their own, the names of the event channels they may see in
// handle_ttl_event: the source's and the other stages'.
func registerEventChannels(c *Chain) {
	for _, st := range c.Stages {
		iso, ok := st.(*isolated.Stage)
		if !ok {
			continue
		}
		iso.RegisterEventChannel(c.Info.ProcessorID, ttlChannelName(c.Info))
		for _, other := range c.Stages {
			iso.RegisterEventChannel(other.ID(), "Python Processor Output")
		}
	}
}

// blockSamplesFor is the block length a chain will use for a stream of
// this rate (as NewChainWith computes it), to size isolated stages' shared
// memory.
func blockSamplesFor(cfg *Config, info pipeline.StreamInfo) int {
	if cfg.Pipeline.BlockSamples > 0 {
		return cfg.Pipeline.BlockSamples
	}
	return max(1, int(cfg.Pipeline.BlockMS*info.SampleRate/1000+0.5))
}
