package daemon

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"runtime"
	"strconv"
	"strings"

	"github.com/pelletier/go-toml/v2"

	"github.com/ephysd/ephysd/drivers"
	"github.com/ephysd/ephysd/pipeline/spikedetect"
	"github.com/ephysd/ephysd/pyrt"
)

// Config is the daemon's configuration file (TOML). Relative paths in it are
// relative to the folder of the file.
type Config struct {
	Source    SourceConfig    `toml:"source"`
	Pipeline  PipelineConfig  `toml:"pipeline"`
	Python    PythonConfig    `toml:"python"`
	Stages    []StageConfig   `toml:"stage"`
	Outputs   []OutputConfig  `toml:"-"` // from [[output]]
	Inputs    []InputConfig   `toml:"-"` // from [[input]]
	Recording RecordingConfig `toml:"recording"`
	Control   ControlConfig   `toml:"control"`
	Realtime  RealtimeConfig  `toml:"realtime"`
	Log       LogConfig       `toml:"log"`

	// Spikes is the [spikes] table: the built-in spike detector, run
	// before the Python stages (off unless it lists electrodes).
	Spikes spikedetect.Config `toml:"spikes"`

	// Driver is the chosen source driver's configuration (from
	// [source.<driver>]), filled by LoadConfig.
	Driver drivers.SourceConfig `toml:"-"`
	path   string
}

// SourceConfig is the [source] table: which driver, and one sub-table per
// driver ([source.sim], [source.playback], …) of which only the chosen one
// is used.
type SourceConfig struct {
	Driver string `toml:"driver"`
}

// OutputConfig is one [[output]]: a TTL output device driven by event
// lines, configured by its driver's [output.<driver>] table.
type OutputConfig struct {
	Driver string
	Sink   drivers.SinkConfig
}

// InputConfig is one [[input]]: a device whose digital input lines are
// merged into the source's digital word from FirstLine on (default 8).
type InputConfig struct {
	Driver    string
	FirstLine int
	Input     drivers.InputConfig
}

// PipelineConfig is the [pipeline] table.
type PipelineConfig struct {
	// BlockMS is the block length in milliseconds (default 1). The block
	// holds round(BlockMS × rate / 1000) samples, at least 1.
	BlockMS float64 `toml:"block_ms"`
	// BlockSamples, if set, overrides BlockMS.
	BlockSamples int `toml:"block_samples"`
	// Preset "closed_loop" sets, for keys left out: block_samples = 1,
	// inline = true, [realtime] priority = 50 and lock_memory = true.
	Preset string `toml:"preset"`
	// Inline reads the source on the stage (Python) thread: one thread
	// hand-off less per block. A stage that falls behind then delays
	// reading; what the device loses meanwhile is recorded as gaps.
	Inline bool `toml:"inline"`
	// QueueMS is how much data each queue between the source, the stages
	// and the recorder can hold before a live source starts dropping blocks
	// (overruns). Default 1000 ms. With Python stages the queue before them
	// holds at least the longest a hung call can stall them, plus 500 ms
	// (3.7 s with the default block_timeout_ms), so a hung script makes no
	// gap.
	QueueMS float64 `toml:"queue_ms"`
}

// PythonConfig is the [python] table: which interpreter to embed.
type PythonConfig struct {
	Executable       string  `toml:"executable"`
	Venv             string  `toml:"venv"`
	SwitchIntervalUS float64 `toml:"switch_interval_us"`
	// BlockTimeoutMS is how long one call into a script (process, a
	// handler, a hook) may run before ephysd interrupts it with
	// TimeoutError (default 2000); the stage then passes data through
	// until reloaded. 0 never interrupts.
	BlockTimeoutMS float64 `toml:"block_timeout_ms"`
}

// StageConfig is one [[stage]]: a Python module run on every block, in the
// order the stages appear.
type StageConfig struct {
	Module  string `toml:"module"`
	Name    string `toml:"name"`
	OnError string `toml:"on_error"` // "continue" (default) or "disable"
	// Isolation is where the stage's Python runs: "none" (default) in
	// ephysd's own interpreter, "process" in a worker process of its own
	// that may crash without taking ephysd down (pyrt/isolated).
	Isolation string `toml:"isolation"`
}

// Stage isolation modes ([[stage]] isolation).
const (
	IsolationNone    = "none"
	IsolationProcess = "process"
)

// RecordingConfig is the [recording] table.
type RecordingConfig struct {
	ParentDirectory string `toml:"parent_directory"` // default ./recordings
	RecordRaw       bool   `toml:"record_raw"`       // also record the pre-Python stream
	RecordOnStart   *bool  `toml:"record_on_start"`  // true: same as control.start_mode = "record" (older configs)
	RecordNodeID    int    `toml:"record_node_id"`   // default: after the stages' ids
	// FlushMS is how often, at most, buffered data and the .npy headers
	// reach the files (a checkpoint): what a crash of ephysd (kill -9, a
	// segfault) can lose. Default 1000, 10–60000.
	FlushMS int `toml:"flush_ms"`
	// Fsync is when the files are synced to the disk: "checkpoint" (each
	// checkpoint: a power cut loses at most flush_ms) or "close" (when a
	// recording is finalised: a power cut can lose what the kernel had not
	// yet written back, up to ~30 s). Default "checkpoint".
	Fsync string `toml:"fsync"`
}

// ControlConfig is the [control] table: the state ephysd starts in and how
// it is controlled.
type ControlConfig struct {
	// StartMode is the state `ephysd run` enters once ready: "idle"
	// (default), "acquire" or "record".
	StartMode string `toml:"start_mode"`
	// HTTP is the address of the Open Ephys-compatible HTTP API (default
	// 127.0.0.1:37497); "" turns it off. An address beyond loopback needs
	// AllowRemote and a token.
	HTTP string `toml:"http"`
	// AllowRemote permits a non-loopback HTTP address.
	AllowRemote bool `toml:"allow_remote"`
	// TokenFile holds the bearer token clients must send (Authorization:
	// Bearer …) — required with AllowRemote.
	TokenFile string `toml:"token_file"`
	// Socket is the unix socket of the CLI (default: $RUNTIME_DIRECTORY,
	// else $XDG_RUNTIME_DIR/ephysd, else /tmp/ephysd-<uid>, + /control.sock).
	Socket string `toml:"socket"`
	// SocketGroup, if set, owns the socket (mode 0660); otherwise 0600.
	SocketGroup string `toml:"socket_group"`
	// ModuleDirs are the folders from which the API may load Python
	// modules (loading a module is running code); default: the folders of
	// the configured stages.
	ModuleDirs []string `toml:"module_dirs"`
	// RecordingDirs are the folders the API may point recordings into
	// (PUT /api/recording parent_directory); default: [recording]
	// parent_directory alone. A folder below one of them is allowed too.
	RecordingDirs []string `toml:"recording_dirs"`
}

// LogConfig is the [log] table.
type LogConfig struct {
	Level  string `toml:"level"`  // debug, info (default), warn, error
	Format string `toml:"format"` // auto (default: journal, console on a terminal, else json), console or json
}

// DefaultConfig is the configuration used for anything the file leaves out.
func DefaultConfig() Config {
	return Config{
		Source:    SourceConfig{Driver: "sim"},
		Pipeline:  PipelineConfig{BlockMS: 1, QueueMS: 1000},
		Python:    PythonConfig{BlockTimeoutMS: 2000},
		Spikes:    spikedetect.DefaultConfig(),
		Recording: RecordingConfig{ParentDirectory: "recordings", FlushMS: 1000, Fsync: "checkpoint"},
		Control:   ControlConfig{HTTP: "127.0.0.1:37497"},
		Log:       LogConfig{Level: "info", Format: "auto"},
	}
}

// ConfigError is a configuration mistake, with where it is.
type ConfigError struct {
	File string
	Line int // 0 when unknown
	Key  string
	Msg  string
}

func (e *ConfigError) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
	}
	if e.Key != "" {
		fmt.Fprintf(&b, ": %s", e.Key)
	}
	fmt.Fprintf(&b, ": %s", e.Msg)
	return b.String()
}

// LoadConfig reads and checks a configuration file. Decoding is strict: an
// unknown key or a value of the wrong type is an error that names the key,
// its line and the expected form.
func LoadConfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	cfg, err := ParseConfig(path, data)
	if err != nil {
		return nil, err
	}
	if err := cfg.checkFiles(data); err != nil {
		return nil, err
	}
	return cfg, nil
}

// ParseConfig is LoadConfig for data already read; path names it in errors
// and anchors relative paths.
func ParseConfig(path string, data []byte) (*Config, error) {
	cfg := DefaultConfig()
	cfg.path = path

	// The document's type: the fixed tables plus one [source.<name>] table
	// per registered driver, each decoded into that driver's own struct.
	names := drivers.SourceNames()
	driverCfgs := make([]drivers.SourceConfig, len(names))
	fields := []reflect.StructField{}
	for i, n := range names {
		c, _ := drivers.NewSourceConfig(n)
		driverCfgs[i] = c
		fields = append(fields, reflect.StructField{
			Name: "D" + fmt.Sprint(i), Type: reflect.TypeOf(c), Tag: reflect.StructTag(fmt.Sprintf(`toml:"%s"`, n)),
		})
	}
	fields = append(fields, reflect.StructField{Name: "Driver", Type: reflect.TypeOf(""), Tag: `toml:"driver"`})
	sourceType := reflect.StructOf(fields)
	// [[output]] entries: decoded strictly into zero-valued driver configs
	// here (which checks keys and types, with lines); the defaults are
	// applied afterwards by decodeOutputs.
	sinkNames := drivers.SinkNames()
	outFields := []reflect.StructField{{Name: "Driver", Type: reflect.TypeOf(""), Tag: `toml:"driver"`}}
	for i, n := range sinkNames {
		c, _ := drivers.NewSinkConfig(n)
		outFields = append(outFields, reflect.StructField{
			Name: "D" + fmt.Sprint(i), Type: reflect.TypeOf(c), Tag: reflect.StructTag(fmt.Sprintf(`toml:"%s"`, n)),
		})
	}
	outputsType := reflect.SliceOf(reflect.StructOf(outFields))
	inFields := []reflect.StructField{
		{Name: "Driver", Type: reflect.TypeOf(""), Tag: `toml:"driver"`},
		{Name: "FirstLine", Type: reflect.TypeOf(0), Tag: `toml:"first_line"`},
	}
	for i, n := range drivers.InputNames() {
		c, _ := drivers.NewInputConfig(n)
		inFields = append(inFields, reflect.StructField{
			Name: "D" + fmt.Sprint(i), Type: reflect.TypeOf(c), Tag: reflect.StructTag(fmt.Sprintf(`toml:"%s"`, n)),
		})
	}
	inputsType := reflect.SliceOf(reflect.StructOf(inFields))
	docType := reflect.StructOf([]reflect.StructField{
		{Name: "Source", Type: reflect.PointerTo(sourceType), Tag: `toml:"source"`},
		{Name: "Pipeline", Type: reflect.TypeOf(&cfg.Pipeline), Tag: `toml:"pipeline"`},
		{Name: "Python", Type: reflect.TypeOf(&cfg.Python), Tag: `toml:"python"`},
		{Name: "Stages", Type: reflect.TypeOf(&cfg.Stages), Tag: `toml:"stage"`},
		{Name: "Recording", Type: reflect.TypeOf(&cfg.Recording), Tag: `toml:"recording"`},
		{Name: "Log", Type: reflect.TypeOf(&cfg.Log), Tag: `toml:"log"`},
		{Name: "Output", Type: outputsType, Tag: `toml:"output"`},
		{Name: "Input", Type: inputsType, Tag: `toml:"input"`},
		{Name: "Control", Type: reflect.TypeOf(&cfg.Control), Tag: `toml:"control"`},
		{Name: "Realtime", Type: reflect.TypeOf(&cfg.Realtime), Tag: `toml:"realtime"`},
		{Name: "Spikes", Type: reflect.TypeOf(&cfg.Spikes), Tag: `toml:"spikes"`},
	})
	doc := reflect.New(docType)
	src := reflect.New(sourceType)
	for i, c := range driverCfgs {
		src.Elem().Field(i).Set(reflect.ValueOf(c))
	}
	src.Elem().FieldByName("Driver").SetString(cfg.Source.Driver)
	doc.Elem().Field(0).Set(src)
	doc.Elem().Field(1).Set(reflect.ValueOf(&cfg.Pipeline))
	doc.Elem().Field(2).Set(reflect.ValueOf(&cfg.Python))
	doc.Elem().Field(3).Set(reflect.ValueOf(&cfg.Stages))
	doc.Elem().FieldByName("Spikes").Set(reflect.ValueOf(&cfg.Spikes))
	doc.Elem().Field(4).Set(reflect.ValueOf(&cfg.Recording))
	doc.Elem().Field(5).Set(reflect.ValueOf(&cfg.Log))
	doc.Elem().FieldByName("Control").Set(reflect.ValueOf(&cfg.Control))
	doc.Elem().FieldByName("Realtime").Set(reflect.ValueOf(&cfg.Realtime))

	dec := toml.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(doc.Interface()); err != nil {
		return nil, explainDecodeError(tomlError(path, data, err), docType)
	}
	cfg.Source.Driver = src.Elem().FieldByName("Driver").String()
	for i, n := range names {
		if n == cfg.Source.Driver {
			cfg.Driver = driverCfgs[i]
		}
	}
	if err := cfg.decodeOutputs(data); err != nil {
		return nil, err
	}
	if cfg.Driver == nil {
		return nil, &ConfigError{File: path, Line: lineOf(data, "driver"), Key: "source.driver",
			Msg: fmt.Sprintf("unknown driver %q: use one of %s", cfg.Source.Driver, strings.Join(names, ", "))}
	}
	if err := cfg.applyPreset(data); err != nil {
		return nil, err
	}
	if err := cfg.check(data); err != nil {
		return nil, err
	}
	cfg.resolvePaths()
	if err := cfg.checkPaths(data); err != nil {
		return nil, err
	}
	return &cfg, nil
}

// decodeEntries decodes the [[key]] entries (each a driver name and its
// [key.<driver>] table) over their drivers' defaults. The strict decoding in
// ParseConfig has already checked every key and type, with lines.
func (c *Config) decodeEntries(data []byte, key string, known []string, newConfig func(name string) (any, error)) ([]string, []any, error) {
	var raw map[string]any
	if err := toml.Unmarshal(data, &raw); err != nil {
		return nil, nil, tomlError(c.path, data, err)
	}
	entries, _ := raw[key].([]any)
	var names []string
	var cfgs []any
	for i, e := range entries {
		entry, _ := e.(map[string]any)
		where := fmt.Sprintf("%s[%d]", key, i+1)
		name, _ := entry["driver"].(string)
		cfg, err := newConfig(name)
		if err != nil {
			return nil, nil, &ConfigError{File: c.path, Line: keyLine(data, where+".driver"), Key: where + ".driver", Msg: fmt.Sprintf("%q: use one of %s", name, strings.Join(known, ", "))}
		}
		for k := range entry {
			if k != "driver" && k != "first_line" && k != name {
				return nil, nil, &ConfigError{File: c.path, Key: where, Msg: fmt.Sprintf("driver is %q but the entry has a [%s.%s] table", name, key, k)}
			}
		}
		if sub, ok := entry[name]; ok {
			b, err := toml.Marshal(sub)
			if err == nil {
				err = toml.Unmarshal(b, cfg)
			}
			if err != nil {
				return nil, nil, &ConfigError{File: c.path, Key: where + "." + name, Msg: err.Error()}
			}
		}
		names = append(names, name)
		cfgs = append(cfgs, cfg)
	}
	return names, cfgs, nil
}

// decodeOutputs fills c.Outputs and c.Inputs.
func (c *Config) decodeOutputs(data []byte) error {
	names, cfgs, err := c.decodeEntries(data, "output", drivers.SinkNames(), func(n string) (any, error) { return drivers.NewSinkConfig(n) })
	if err != nil {
		return err
	}
	for i := range names {
		c.Outputs = append(c.Outputs, OutputConfig{Driver: names[i], Sink: cfgs[i].(drivers.SinkConfig)})
	}
	names, cfgs, err = c.decodeEntries(data, "input", drivers.InputNames(), func(n string) (any, error) { return drivers.NewInputConfig(n) })
	if err != nil {
		return err
	}
	var raw struct {
		Input []struct {
			FirstLine *int `toml:"first_line"`
		} `toml:"input"`
	}
	toml.Unmarshal(data, &raw)
	for i := range names {
		first := 8
		if i < len(raw.Input) && raw.Input[i].FirstLine != nil {
			first = *raw.Input[i].FirstLine
		}
		c.Inputs = append(c.Inputs, InputConfig{Driver: names[i], FirstLine: first, Input: cfgs[i].(drivers.InputConfig)})
	}
	return nil
}

func (c *Config) check(data []byte) error {
	bad := func(key, msg string) error {
		return &ConfigError{File: c.path, Line: keyLine(data, key), Key: key, Msg: msg}
	}
	p := c.Pipeline
	if p.BlockMS <= 0 || math.IsNaN(p.BlockMS) || math.IsInf(p.BlockMS, 0) {
		return bad("pipeline.block_ms", fmt.Sprintf("%v: must be a number of milliseconds > 0 (default 1)", p.BlockMS))
	}
	if p.BlockSamples < 0 {
		return bad("pipeline.block_samples", fmt.Sprintf("%d: must be at least 1 (or leave it out to use block_ms)", p.BlockSamples))
	}
	if p.QueueMS <= 0 {
		return bad("pipeline.queue_ms", fmt.Sprintf("%v: must be > 0 milliseconds (default 1000)", p.QueueMS))
	}
	if c.Realtime.Priority < 0 || c.Realtime.Priority > 99 {
		return bad("realtime.priority", fmt.Sprintf("%d: SCHED_FIFO priorities are 1–99 (0: normal scheduling)", c.Realtime.Priority))
	}
	if c.Python.Executable != "" && c.Python.Venv != "" {
		return bad("python.venv", "set python.executable or python.venv, not both")
	}
	if c.Python.BlockTimeoutMS < 0 {
		return bad("python.block_timeout_ms", "must be ≥ 0 milliseconds (0: never interrupt; default 2000)")
	}
	if c.Python.SwitchIntervalUS < 0 {
		return bad("python.switch_interval_us", "must be > 0 microseconds (default 100)")
	}
	for i, s := range c.Stages {
		if s.Module == "" {
			return &ConfigError{File: c.path, Key: fmt.Sprintf("stage[%d].module", i+1), Msg: "missing: the path of the Python module"}
		}
		switch pyrt.OnError(s.OnError) {
		case "", pyrt.OnErrorContinue, pyrt.OnErrorDisable:
		default:
			return bad(fmt.Sprintf("stage[%d].on_error", i+1), fmt.Sprintf("%q: use \"continue\" or \"disable\"", s.OnError))
		}
		switch s.Isolation {
		case "", IsolationNone, IsolationProcess:
		default:
			return bad(fmt.Sprintf("stage[%d].isolation", i+1), fmt.Sprintf("%q: use \"none\" (in ephysd's interpreter, the default) or \"process\" (a worker process of its own, restarted if it crashes)", s.Isolation))
		}
	}
	if c.Control.StartMode == "" {
		c.Control.StartMode = "idle"
		if c.Recording.RecordOnStart != nil && *c.Recording.RecordOnStart {
			c.Control.StartMode = "record"
		}
	}
	switch c.Control.StartMode {
	case "idle", "acquire", "record":
	default:
		return bad("control.start_mode", fmt.Sprintf("%q: use idle, acquire or record", c.Control.StartMode))
	}
	if err := c.checkHTTPAddr(data); err != nil {
		return err
	}
	if c.Control.HTTP != "" && !c.Control.AllowRemote && !loopbackAddr(c.Control.HTTP) {
		return bad("control.http", fmt.Sprintf("%q is not a loopback address: set allow_remote = true and token_file to listen beyond this machine", c.Control.HTTP))
	}
	if c.Control.AllowRemote && c.Control.TokenFile == "" {
		return bad("control.allow_remote", "needs token_file: clients beyond loopback must present a bearer token")
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		return bad("log.level", fmt.Sprintf("%q: use debug, info, warn or error", c.Log.Level))
	}
	switch c.Log.Format {
	case "auto", "console", "json":
	default:
		return bad("log.format", fmt.Sprintf("%q: use auto, console or json", c.Log.Format))
	}
	if c.Recording.ParentDirectory == "" {
		return bad("recording.parent_directory", "must not be empty")
	}
	if ms := c.Recording.FlushMS; ms < 10 || ms > 60000 {
		return bad("recording.flush_ms", fmt.Sprintf("%d: must be 10–60000 milliseconds (default 1000): how much recorded data a crash of ephysd may lose", ms))
	}
	switch c.Recording.Fsync {
	case "checkpoint", "close":
	default:
		return bad("recording.fsync", fmt.Sprintf("%q: use \"checkpoint\" (sync at every flush: a power cut loses at most flush_ms) or \"close\" (sync when a recording ends)", c.Recording.Fsync))
	}
	if err := c.checkSpikes(data); err != nil {
		return err
	}
	return c.checkRanges(data)
}

// resolvePaths makes relative paths relative to the configuration file.
func (c *Config) resolvePaths() {
	base, err := filepath.Abs(filepath.Dir(c.path))
	if err != nil {
		base = filepath.Dir(c.path)
	}
	abs := func(p string) string {
		if p == "" || filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(base, p)
	}
	for i := range c.Stages {
		c.Stages[i].Module = abs(c.Stages[i].Module)
	}
	c.Recording.ParentDirectory = abs(c.Recording.ParentDirectory)
	if strings.ContainsRune(c.Python.Executable, '/') {
		c.Python.Executable = abs(c.Python.Executable)
	}
	c.Python.Venv = abs(c.Python.Venv)
	c.Control.TokenFile = abs(c.Control.TokenFile)
	if c.Control.Socket != "" {
		c.Control.Socket = abs(c.Control.Socket)
	}
	for i, d := range c.Control.ModuleDirs {
		c.Control.ModuleDirs[i] = abs(d)
	}
	if len(c.Control.ModuleDirs) == 0 {
		seen := map[string]bool{}
		for _, s := range c.Stages {
			d := filepath.Dir(s.Module)
			if !seen[d] {
				seen[d] = true
				c.Control.ModuleDirs = append(c.Control.ModuleDirs, d)
			}
		}
	}
	for i, d := range c.Control.RecordingDirs {
		c.Control.RecordingDirs[i] = abs(d)
	}
	if len(c.Control.RecordingDirs) == 0 {
		c.Control.RecordingDirs = []string{c.Recording.ParentDirectory}
	}
	if r, ok := c.Driver.(interface{ ResolvePaths(base string) }); ok {
		r.ResolvePaths(base)
	}
}

// loopbackAddr reports whether a host:port listens on loopback only.
func loopbackAddr(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// tomlError turns a go-toml error into a ConfigError with line and key.
func tomlError(path string, data []byte, err error) error {
	var strict *toml.StrictMissingError
	if errors.As(err, &strict) && len(strict.Errors) > 0 {
		e := strict.Errors[0]
		row, _ := e.Position()
		return &ConfigError{File: path, Line: row, Key: strings.Join(e.Key(), "."),
			Msg: "unknown key (check its spelling and the table it is in; see the configuration reference in README.md)"}
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		row, _ := de.Position()
		key := strings.Join(de.Key(), ".")
		if key == "" {
			key = keyPathAt(data, row)
		}
		msg := strings.TrimPrefix(de.Error(), "toml: ")
		return &ConfigError{File: path, Line: row, Key: key, Msg: expected(msg)}
	}
	msg := strings.TrimPrefix(err.Error(), "toml: ")
	if strings.HasPrefix(msg, "table ") && strings.HasSuffix(msg, " already exists") {
		// go-toml names only the table's last part: find the header
		// given twice.
		seen := map[string]int{}
		for i, p := range keyPaths(data) {
			l := strings.TrimSpace(strings.Split(string(data), "\n")[i])
			if !strings.HasPrefix(l, "[") || strings.HasPrefix(l, "[[") {
				continue
			}
			if first, dup := seen[p]; dup {
				return &ConfigError{File: path, Line: i + 1, Key: p,
					Msg: fmt.Sprintf("the table [%s] is given twice (first on line %d): put its keys in one table", p, first)}
			}
			seen[p] = i + 1
		}
	}
	return &ConfigError{File: path, Msg: msg}
}

// expected rewords go-toml's type errors as what the user should write.
func expected(msg string) string {
	if m := tomlTypeError.FindStringSubmatch(msg); m != nil {
		// "cannot decode TOML string into struct field
		// daemon.RealtimeConfig.CPUs of type []int": the Go names mean
		// nothing to the user.
		return "got a TOML " + m[1] + expectedForm(msg)
	}
	return msg + expectedForm(msg)
}

var tomlTypeError = regexp.MustCompile(`cannot decode TOML (\w+) into struct field \S+ of type \S+`)

// expectedForm is " (expected …)" for a go-toml type error, or "".
func expectedForm(msg string) string {
	switch {
	case strings.Contains(msg, "into struct field") && strings.Contains(msg, "of type int"):
		return " (expected a whole number, like 32)"
	case strings.Contains(msg, "of type float"):
		return " (expected a number, like 30000.0)"
	case strings.Contains(msg, "of type bool"):
		return " (expected true or false)"
	case strings.Contains(msg, "of type string"):
		return " (expected a quoted string)"
	case strings.Contains(msg, "float cannot be assigned to int"):
		return " (expected a whole number)"
	case strings.Contains(msg, "of type *bool"):
		return " (expected true or false)"
	case strings.Contains(msg, "of type []string"):
		return ` (expected a list of quoted strings, like ["a", "b"])`
	case strings.Contains(msg, "of type []int") || strings.Contains(msg, "of type []float"):
		return " (expected a list of whole numbers, like [1, 2])"
	}
	return ""
}

func keyOnLine(data []byte, row int) string {
	lines := strings.Split(string(data), "\n")
	if row < 1 || row > len(lines) {
		return ""
	}
	l := lines[row-1]
	if i := strings.IndexByte(l, '='); i > 0 {
		return strings.TrimSpace(l[:i])
	}
	return ""
}

// lineOf finds the first line that assigns key, for errors found after
// decoding.
func lineOf(data []byte, key string) int {
	for i, l := range strings.Split(string(data), "\n") {
		l = strings.TrimSpace(l)
		if strings.HasPrefix(l, key) {
			rest := strings.TrimSpace(l[len(key):])
			if strings.HasPrefix(rest, "=") {
				return i + 1
			}
		}
	}
	return 0
}

// Limits of the [pipeline] and [python] values: beyond them a value is a
// typo, and one that would make ephysd allocate more memory than a rig has
// (the block pool holds queue_ms of data) or never interrupt a script.
const (
	maxBlockMS        = 10000
	maxBlockSamples   = 1 << 20
	maxQueueMS        = 60000
	maxSwitchUS       = 1e6
	maxBlockTimeoutMS = 3600000
	maxCPU            = 1023 // CPU_SETSIZE - 1
	maxSocketPath     = 107  // sun_path holds 108 bytes with the NUL
)

// checkRanges checks the values that have a range or a set of allowed
// values beyond what check covers, and every driver table through its
// driver's own Validate or Check.
func (c *Config) checkRanges(data []byte) error {
	bad := func(key, msg string) error {
		return &ConfigError{File: c.path, Line: keyLine(data, key), Key: key, Msg: msg}
	}
	finite := func(v float64) bool { return !math.IsNaN(v) && !math.IsInf(v, 0) }
	p := c.Pipeline
	if p.BlockMS > maxBlockMS {
		return bad("pipeline.block_ms", fmt.Sprintf("%v: must be a number of milliseconds > 0 and ≤ %d (default 1)", p.BlockMS, maxBlockMS))
	}
	if p.BlockSamples > maxBlockSamples {
		return bad("pipeline.block_samples", fmt.Sprintf("%d: must be 1–%d (or leave it out to use block_ms)", p.BlockSamples, maxBlockSamples))
	}
	if !finite(p.QueueMS) || p.QueueMS > maxQueueMS {
		return bad("pipeline.queue_ms", fmt.Sprintf("%v: must be > 0 and ≤ %d milliseconds (default 1000): the queues hold that much data in memory", p.QueueMS, maxQueueMS))
	}
	if v := c.Python.SwitchIntervalUS; !finite(v) || v > maxSwitchUS {
		return bad("python.switch_interval_us", fmt.Sprintf("%v: must be 0–%g microseconds (0 or left out: 100)", v, maxSwitchUS))
	}
	if v := c.Python.BlockTimeoutMS; !finite(v) || v > maxBlockTimeoutMS {
		return bad("python.block_timeout_ms", fmt.Sprintf("%v: must be 0–%d milliseconds (0: never interrupt; default 2000)", v, maxBlockTimeoutMS))
	}
	seen := map[int]bool{}
	for i, cpu := range c.Realtime.CPUs {
		if cpu < 0 || cpu > maxCPU {
			return bad("realtime.cpus", fmt.Sprintf("cpus[%d] = %d: CPU numbers are 0–%d (this machine has 0–%d)", i, cpu, maxCPU, runtime.NumCPU()-1))
		}
		if seen[cpu] {
			return bad("realtime.cpus", fmt.Sprintf("CPU %d is listed twice", cpu))
		}
		seen[cpu] = true
	}
	if id := c.Recording.RecordNodeID; id < 0 {
		return bad("recording.record_node_id", fmt.Sprintf("%d: must be a processor id ≥ 1 (0 or left out: after the stages' ids)", id))
	} else if id != 0 && id >= 100 && id <= firstStageID+len(c.Stages)-1 {
		taken := "the source is processor 100"
		if n := len(c.Stages); n > 0 {
			taken += fmt.Sprintf(" and the Python stages %d–%d", firstStageID, firstStageID+n-1)
		}
		return bad("recording.record_node_id", fmt.Sprintf("%d is taken: %s; use %d or another free id", id, taken, firstStageID+len(c.Stages)))
	}
	for i, in := range c.Inputs {
		key := fmt.Sprintf("input[%d].first_line", i+1)
		if in.FirstLine < 0 || in.FirstLine > 63 {
			return bad(key, fmt.Sprintf("%d: lines are 0–63", in.FirstLine))
		}
		if w := in.Input.Width(); in.FirstLine+w > 64 {
			return bad(key, fmt.Sprintf("%d with the device's %d lines goes past line 63: use a first_line ≤ %d", in.FirstLine, w, 64-w))
		}
	}
	if err := c.checkDrivers(data); err != nil {
		return err
	}
	return c.checkStrings(data)
}

// checkHTTPAddr checks that [control] http is host:port with a port number.
func (c *Config) checkHTTPAddr(data []byte) error {
	h := c.Control.HTTP
	if h == "" {
		return nil
	}
	host, port, err := net.SplitHostPort(h)
	n, perr := strconv.Atoi(port)
	if err != nil || perr != nil || n < 0 || n > 65535 || strings.ContainsAny(host, " /") {
		return &ConfigError{File: c.path, Line: keyLine(data, "control.http"), Key: "control.http",
			Msg: fmt.Sprintf("%q: must be host:port with a port 0–65535, e.g. \"127.0.0.1:37497\" (\"\" turns the HTTP API off)", h)}
	}
	return nil
}

// validator is a driver configuration that checks its own values (sim,
// openbci, spikerbox and stream have Validate; ftdi and pulsepal Check).
type validator interface{ Validate() error }
type checker interface{ Check() error }

// checkDrivers runs the drivers' own checks of the chosen source's table and
// of every [[output]] and [[input]] table, so that a value out of range is
// found when the file is read (and refused by a reload) rather than when the
// device is opened.
func (c *Config) checkDrivers(data []byte) error {
	validate := func(cfg any) error {
		switch v := cfg.(type) {
		case validator:
			return v.Validate()
		case checker:
			return v.Check()
		}
		return nil
	}
	run := func(table string, cfg, defaults any) error {
		err := validate(cfg)
		if err == nil {
			return nil
		}
		key := table
		if k := culprit(cfg, defaults, validate); k != "" {
			key += "." + k
		} else if k := keyInMessage(err.Error(), cfg); k != "" {
			key += "." + k
		}
		line := keyLine(data, key)
		if line == 0 {
			line = keyLine(data, table)
		}
		return &ConfigError{File: c.path, Line: line, Key: key, Msg: err.Error()}
	}
	def, _ := drivers.NewSourceConfig(c.Source.Driver)
	if err := run("source."+c.Source.Driver, c.Driver, def); err != nil {
		return err
	}
	for i, o := range c.Outputs {
		def, _ := drivers.NewSinkConfig(o.Driver)
		if err := run(fmt.Sprintf("output[%d].%s", i+1, o.Driver), o.Sink, def); err != nil {
			return err
		}
	}
	for i, in := range c.Inputs {
		def, _ := drivers.NewInputConfig(in.Driver)
		if err := run(fmt.Sprintf("input[%d].%s", i+1, in.Driver), in.Input, def); err != nil {
			return err
		}
	}
	return nil
}

// culprit finds the key of cfg (a pointer to a driver's struct) whose value
// makes validate fail: the first key that, set back to its default (from
// defaults, of the same type), makes the error go away. "" when none does,
// or cfg is no pointer to a struct.
func culprit(cfg, defaults any, validate func(any) error) string {
	v, d := reflect.ValueOf(cfg), reflect.ValueOf(defaults)
	if v.Kind() != reflect.Pointer || v.Elem().Kind() != reflect.Struct || d.Type() != v.Type() {
		return ""
	}
	t := v.Elem().Type()
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		if !f.IsExported() || name == "" || name == "-" || reflect.DeepEqual(v.Elem().Field(i).Interface(), d.Elem().Field(i).Interface()) {
			continue
		}
		clone := reflect.New(t)
		clone.Elem().Set(v.Elem())
		clone.Elem().Field(i).Set(d.Elem().Field(i))
		if validate(clone.Interface()) == nil {
			return name
		}
	}
	return ""
}

// keyInMessage is the key of cfg (a struct or a pointer to one) that a
// driver's error message names first, or "".
func keyInMessage(msg string, cfg any) string {
	t := reflect.TypeOf(cfg)
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == nil || t.Kind() != reflect.Struct {
		return ""
	}
	best, at := "", len(msg)+1
	for _, k := range tomlKeys(t) {
		for from := 0; ; {
			i := strings.Index(msg[from:], k)
			if i < 0 {
				break
			}
			i += from
			end := i + len(k)
			if (i == 0 || !isKeyChar(msg[i-1])) && (end == len(msg) || !isKeyChar(msg[end])) {
				if i < at {
					best, at = k, i
				}
				break
			}
			from = end
		}
	}
	return best
}

func isKeyChar(b byte) bool {
	return b == '_' || b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9'
}

// checkStrings refuses a NUL character in any string of the configuration
// (a TOML file can hold one as \u0000): no path, name or address has one,
// and the C calls that get them would cut them short.
func (c *Config) checkStrings(data []byte) error {
	var err error
	var walk func(key string, v reflect.Value)
	walk = func(key string, v reflect.Value) {
		if err != nil || !v.IsValid() {
			return
		}
		switch v.Kind() {
		case reflect.Pointer, reflect.Interface:
			if !v.IsNil() {
				walk(key, v.Elem())
			}
		case reflect.String:
			if strings.IndexByte(v.String(), 0) >= 0 {
				err = &ConfigError{File: c.path, Line: keyLine(data, key), Key: key,
					Msg: fmt.Sprintf("%q holds a NUL character (\\u0000): remove it", v.String())}
			}
		case reflect.Slice:
			for i := 0; i < v.Len(); i++ {
				walk(fmt.Sprintf("%s[%d]", key, i+1), v.Index(i))
			}
		case reflect.Struct:
			t := v.Type()
			for i := 0; i < t.NumField(); i++ {
				f := t.Field(i)
				name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
				if !f.IsExported() || name == "-" || name == "" {
					continue
				}
				sub := name
				if key != "" {
					sub = key + "." + name
				}
				walk(sub, v.Field(i))
			}
		}
	}
	walk("", reflect.ValueOf(c).Elem())
	walk("source."+c.Source.Driver, reflect.ValueOf(c.Driver))
	for i, o := range c.Outputs {
		walk(fmt.Sprintf("output[%d].%s", i+1, o.Driver), reflect.ValueOf(o.Sink))
	}
	for i, in := range c.Inputs {
		walk(fmt.Sprintf("input[%d].%s", i+1, in.Driver), reflect.ValueOf(in.Input))
	}
	return err
}

// checkPaths checks the paths once they are absolute: every stage's module
// lies in one of [control] module_dirs (when the file sets them: by default
// they are the stages' own folders), and the socket path fits a unix
// socket address.
func (c *Config) checkPaths(data []byte) error {
	for i, s := range c.Stages {
		if !withinDirs(s.Module, c.Control.ModuleDirs) {
			key := fmt.Sprintf("stage[%d].module", i+1)
			return &ConfigError{File: c.path, Line: keyLine(data, key), Key: key,
				Msg: fmt.Sprintf("%s is outside the folders modules may be loaded from ([control] module_dirs: %s): move it there or add its folder to module_dirs", s.Module, strings.Join(c.Control.ModuleDirs, ", "))}
		}
	}
	if n := len(c.Control.Socket); n > maxSocketPath {
		return &ConfigError{File: c.path, Line: keyLine(data, "control.socket"), Key: "control.socket",
			Msg: fmt.Sprintf("%s is %d bytes long: a unix socket path holds at most %d; choose a shorter one", c.Control.Socket, n, maxSocketPath)}
	}
	return nil
}

// checkFiles checks what the configuration names on this machine (LoadConfig
// only: ParseConfig also reads configurations written for another machine).
// Every stage's module must be a readable regular file inside module_dirs
// once symbolic links are followed; module_dirs must be folders; with
// allow_remote the token file must be readable; socket_group must exist.
func (c *Config) checkFiles(data []byte) error {
	bad := func(key, msg string) error {
		return &ConfigError{File: c.path, Line: keyLine(data, key), Key: key, Msg: msg}
	}
	explicitDirs := lineOf(data, "module_dirs") > 0
	for i, d := range c.Control.ModuleDirs {
		if !explicitDirs {
			break
		}
		if fi, err := os.Stat(d); err != nil || !fi.IsDir() {
			return bad("control.module_dirs", fmt.Sprintf("module_dirs[%d] = %s is not a folder: create it or fix the path", i+1, d))
		}
	}
	for i, s := range c.Stages {
		key := fmt.Sprintf("stage[%d].module", i+1)
		if err := checkModuleFile(s.Module); err != nil {
			return bad(key, err.Error())
		}
		if real, err := filepath.EvalSymlinks(s.Module); err == nil && !withinDirs(real, realDirs(c.Control.ModuleDirs)) {
			return bad(key, fmt.Sprintf("%s is a link to %s, outside the folders modules may be loaded from ([control] module_dirs: %s)", s.Module, real, strings.Join(c.Control.ModuleDirs, ", ")))
		}
	}
	if c.Control.AllowRemote && c.Control.HTTP != "" {
		if f, err := os.Open(c.Control.TokenFile); err != nil {
			return bad("control.token_file", fmt.Sprintf("%v: make it a file the service user can read, holding a long random token (openssl rand -hex 32)", err))
		} else {
			f.Close()
		}
	}
	if g := c.Control.SocketGroup; g != "" {
		if _, err := lookupGroup(g); err != nil {
			return bad("control.socket_group", fmt.Sprintf("%q: %v (create it with groupadd, or leave socket_group out for an owner-only socket)", g, err))
		}
	}
	return nil
}

// checkModuleFile says why path cannot be a stage's Python module, or nil:
// it must exist, be a regular file (not a folder, a device or a pipe) and be
// readable by this process.
func checkModuleFile(path string) error {
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("%s: no such file: check the path", path)
	case err != nil:
		return fmt.Errorf("%s: %v", path, err)
	case fi.IsDir():
		return fmt.Errorf("%s is a folder, not a Python file: name the module's .py file", path)
	case !fi.Mode().IsRegular():
		return fmt.Errorf("%s is not a regular file (%s): name the module's .py file", path, fi.Mode().Type())
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("%s cannot be read: %v — make it readable by the user ephysd runs as", path, errors.Unwrap(err))
	}
	f.Close()
	return nil
}

// withinDirs reports whether path (absolute) is one of dirs or lies below
// one of them, lexically.
func withinDirs(path string, dirs []string) bool {
	path = filepath.Clean(path)
	for _, d := range dirs {
		rel, err := filepath.Rel(filepath.Clean(d), path)
		if err == nil && rel != ".." && !strings.HasPrefix(rel, "../") && !filepath.IsAbs(rel) {
			return true
		}
	}
	return false
}

// realDirs is dirs with symbolic links resolved (a folder that does not
// exist stays as it is).
func realDirs(dirs []string) []string {
	out := make([]string, 0, 2*len(dirs))
	for _, d := range dirs {
		out = append(out, d)
		if r, err := filepath.EvalSymlinks(d); err == nil && r != d {
			out = append(out, r)
		}
	}
	return out
}

// explainDecodeError completes a decoding error from the document's type:
// a value of the wrong type gets the form its key takes, an unknown key the
// keys its table allows and the one closest to the mistyped key.
func explainDecodeError(err error, docType reflect.Type) error {
	var ce *ConfigError
	if !errors.As(err, &ce) || ce.Key == "" {
		return err
	}
	parts := strings.Split(ce.Key, ".")
	for i, p := range parts {
		if j := strings.IndexByte(p, '['); j > 0 {
			parts[i] = p[:j] // stage[2] → stage
		}
	}
	if strings.HasPrefix(ce.Msg, "got a TOML") && !strings.Contains(ce.Msg, "(expected") {
		t := docType
		for _, p := range parts {
			if t = fieldType(t, p); t == nil {
				return err
			}
		}
		if f := valueForm(t); f != "" {
			ce.Msg += " (expected " + f + ")"
		}
		return ce
	}
	if !strings.HasPrefix(ce.Msg, "unknown key") {
		return err
	}
	t := docType
	for _, p := range parts[:len(parts)-1] {
		if t = fieldType(t, p); t == nil {
			return err
		}
	}
	keys := tomlKeys(t)
	if len(keys) == 0 {
		return err
	}
	table := "the top level"
	if len(parts) > 1 {
		table = "[" + strings.Join(parts[:len(parts)-1], ".") + "]"
	}
	msg := fmt.Sprintf("unknown key: %s takes %s", table, strings.Join(keys, ", "))
	if best := closestKey(parts[len(parts)-1], keys); best != "" {
		msg += fmt.Sprintf(" — did you mean %s?", best)
	}
	ce.Msg = msg + " (see the configuration reference in README.md)"
	return ce
}

// valueForm says what a value of type t is written as in TOML.
func valueForm(t reflect.Type) string {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.String:
		return "a quoted string"
	case reflect.Bool:
		return "true or false"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "a whole number, like 32"
	case reflect.Float32, reflect.Float64:
		return "a number, like 30000.0"
	case reflect.Struct:
		return "a table"
	case reflect.Slice:
		switch e := t.Elem(); e.Kind() {
		case reflect.String:
			return `a list of quoted strings, like ["a", "b"]`
		case reflect.Float32, reflect.Float64:
			return "a list of numbers, like [1.5, 2]"
		case reflect.Struct, reflect.Pointer:
			return "[[tables]]"
		default:
			return "a list of whole numbers, like [1, 2]"
		}
	}
	return ""
}

// fieldType is the type of the field of struct t (through pointers and
// slices) whose toml name is name, or nil.
func fieldType(t reflect.Type, name string) reflect.Type {
	for t.Kind() == reflect.Pointer || t.Kind() == reflect.Slice {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct {
		return nil
	}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if n, _, _ := strings.Cut(f.Tag.Get("toml"), ","); n == name {
			return f.Type
		}
	}
	return nil
}

// tomlKeys are the toml names of struct t's fields (through pointers and
// slices), in their order.
func tomlKeys(t reflect.Type) []string {
	for t.Kind() == reflect.Pointer || t.Kind() == reflect.Slice {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct {
		return nil
	}
	var keys []string
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if n, _, _ := strings.Cut(f.Tag.Get("toml"), ","); f.IsExported() && n != "" && n != "-" {
			keys = append(keys, n)
		}
	}
	return keys
}

// closestKey is the key within edit distance 2 of typo (3 for long keys),
// or "".
func closestKey(typo string, keys []string) string {
	best, bestD := "", 3
	if len(typo) > 8 {
		bestD = 4
	}
	for _, k := range keys {
		if d := editDistance(strings.ToLower(typo), k); d < bestD {
			best, bestD = k, d
		}
	}
	return best
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// keyLine is the line of a key given as a path ("source.sim.channels",
// "stage[2].on_error", "output[1].pulsepal.map[2].line"), or of a table
// given as one ("output[1].pulsepal"), following the file's table headers;
// when it finds neither it falls back to the first line that assigns the
// last part of the key (lineOf).
func keyLine(data []byte, key string) int {
	for i, p := range keyPaths(data) {
		if p == key {
			return i + 1
		}
	}
	return lineOf(data, key[strings.LastIndexAny(key, ".]")+1:])
}

// keyPathAt is the path of the key assigned (or the table opened) on line
// row, or "".
func keyPathAt(data []byte, row int) string {
	paths := keyPaths(data)
	if row < 1 || row > len(paths) {
		return keyOnLine(data, row)
	}
	return paths[row-1]
}

// keyPaths gives each line of a TOML document the path of the key it
// assigns or the table it opens ("" for other lines), numbering arrays of
// tables from 1: [[stage]] then on_error = … is "stage[1].on_error".
func keyPaths(data []byte) []string {
	counts := map[string]int{}
	resolve := func(segs []string) string {
		out := ""
		for _, s := range segs {
			cand := s
			if out != "" {
				cand = out + "." + s
			}
			if n := counts[cand]; n > 0 {
				cand += "[" + strconv.Itoa(n) + "]"
			}
			out = cand
		}
		return out
	}
	split := func(h string) []string {
		segs := strings.Split(h, ".")
		for i := range segs {
			segs[i] = strings.Trim(strings.TrimSpace(segs[i]), `"'`)
		}
		return segs
	}
	lines := strings.Split(string(data), "\n")
	paths := make([]string, len(lines))
	table := ""
	for i, l := range lines {
		l = strings.TrimSpace(l)
		switch {
		case strings.HasPrefix(l, "#"):
		case strings.HasPrefix(l, "[["):
			end := strings.Index(l, "]]")
			if end < 0 {
				continue
			}
			segs := split(l[2:end])
			name := segs[len(segs)-1]
			if parent := resolve(segs[:len(segs)-1]); parent != "" {
				name = parent + "." + name
			}
			counts[name]++
			table = name + "[" + strconv.Itoa(counts[name]) + "]"
			paths[i] = table
		case strings.HasPrefix(l, "["):
			end := strings.IndexByte(l, ']')
			if end < 0 {
				continue
			}
			table = resolve(split(l[1:end]))
			paths[i] = table
		default:
			eq := strings.IndexByte(l, '=')
			if eq <= 0 {
				continue
			}
			k := strings.Join(split(l[:eq]), ".")
			if table != "" {
				k = table + "." + k
			}
			paths[i] = k
		}
	}
	return paths
}
