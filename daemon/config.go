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
	"strings"

	"github.com/pelletier/go-toml/v2"

	"github.com/ephysd/ephysd/drivers"
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
	// (overruns). Default 1000 ms.
	QueueMS float64 `toml:"queue_ms"`
}

// PythonConfig is the [python] table: which interpreter to embed.
type PythonConfig struct {
	Executable       string  `toml:"executable"`
	Venv             string  `toml:"venv"`
	SwitchIntervalUS float64 `toml:"switch_interval_us"`
	// BlockTimeoutMS is how long one process()/handler call may run before
	// ephysd raises TimeoutError in it (default 2000); 0 never does.
	BlockTimeoutMS float64 `toml:"block_timeout_ms"`
}

// StageConfig is one [[stage]]: a Python module run on every block, in the
// order the stages appear.
type StageConfig struct {
	Module  string `toml:"module"`
	Name    string `toml:"name"`
	OnError string `toml:"on_error"` // "continue" (default) or "disable"
}

// RecordingConfig is the [recording] table.
type RecordingConfig struct {
	ParentDirectory string `toml:"parent_directory"` // default ./recordings
	RecordRaw       bool   `toml:"record_raw"`       // also record the pre-Python stream
	RecordOnStart   *bool  `toml:"record_on_start"`  // true: same as control.start_mode = "record" (older configs)
	RecordNodeID    int    `toml:"record_node_id"`   // default: after the stages' ids
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
		Recording: RecordingConfig{ParentDirectory: "recordings"},
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
	return ParseConfig(path, data)
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
	doc.Elem().Field(4).Set(reflect.ValueOf(&cfg.Recording))
	doc.Elem().Field(5).Set(reflect.ValueOf(&cfg.Log))
	doc.Elem().FieldByName("Control").Set(reflect.ValueOf(&cfg.Control))
	doc.Elem().FieldByName("Realtime").Set(reflect.ValueOf(&cfg.Realtime))

	dec := toml.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(doc.Interface()); err != nil {
		return nil, tomlError(path, data, err)
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
			return nil, nil, &ConfigError{File: c.path, Key: where + ".driver", Msg: fmt.Sprintf("%q: use one of %s", name, strings.Join(known, ", "))}
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
		last := key[strings.LastIndexByte(key, '.')+1:]
		return &ConfigError{File: c.path, Line: lineOf(data, last), Key: key, Msg: msg}
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
	return nil
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
			key = keyOnLine(data, row)
		}
		msg := strings.TrimPrefix(de.Error(), "toml: ")
		return &ConfigError{File: path, Line: row, Key: key, Msg: expected(msg)}
	}
	return &ConfigError{File: path, Msg: err.Error()}
}

// expected rewords go-toml's type errors as what the user should write.
func expected(msg string) string {
	switch {
	case strings.Contains(msg, "into struct field") && strings.Contains(msg, "of type int"):
		return msg + " (expected a whole number, like 32)"
	case strings.Contains(msg, "of type float"):
		return msg + " (expected a number, like 30000.0)"
	case strings.Contains(msg, "of type bool"):
		return msg + " (expected true or false)"
	case strings.Contains(msg, "of type string"):
		return msg + " (expected a quoted string)"
	case strings.Contains(msg, "float cannot be assigned to int"):
		return msg + " (expected a whole number)"
	}
	return msg
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
