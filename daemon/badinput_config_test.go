package daemon

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/ephysd/ephysd/drivers"
)

// configKey is one key of the configuration file, found by walking the
// configuration's Go types: the fixed tables of Config, one [source.<name>]
// table per registered source driver, and the [[output]] and [[input]]
// entries with one table per registered output and input driver.
type configKey struct {
	path string       // "source.sim.channels", "stage.on_error", "output.pulsepal.map.line"
	typ  reflect.Type // the Go type the value decodes into
	// doc places the key's line in a document that is valid around it: it
	// returns the document with line as the last line.
	doc func(line string) string
}

// configKeys walks the configuration's types. A key added to any of them
// later (or a driver registered later) is found here without a change to
// this test.
func configKeys(t testing.TB) []configKey {
	t.Helper()
	var keys []configKey
	var walk func(prefix string, typ reflect.Type, header func(line string) string)
	walk = func(prefix string, typ reflect.Type, doc func(string) string) {
		for typ.Kind() == reflect.Pointer {
			typ = typ.Elem()
		}
		for i := 0; i < typ.NumField(); i++ {
			f := typ.Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
			if !f.IsExported() || name == "" || name == "-" {
				continue
			}
			path := prefix + name
			ft := f.Type
			for ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			switch {
			case ft.Kind() == reflect.Struct:
				sub := path
				walk(path+".", ft, func(line string) string { return doc("") + "[" + sub + "]\n" + line + "\n" })
			case ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.Struct:
				sub := path
				walk(path+".", ft.Elem(), func(line string) string { return doc("") + "[[" + sub + "]]\n" + line + "\n" })
			default:
				d := doc
				keys = append(keys, configKey{path: path, typ: f.Type, doc: func(line string) string { return d(line) }})
			}
		}
	}
	top := func(line string) string { return line + "\n" }
	cfgType := reflect.TypeOf(Config{})
	for i := 0; i < cfgType.NumField(); i++ {
		f := cfgType.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		if name == "" || name == "-" {
			continue
		}
		ft := f.Type
		switch {
		case ft.Kind() == reflect.Slice:
			n := name
			walk(n+".", ft.Elem(), func(line string) string { return top("[[" + n + "]]\n" + line) })
		case name == "source":
			walk("source.", ft, func(line string) string { return top("[source]\n" + line) })
			for _, d := range drivers.SourceNames() {
				c, _ := drivers.NewSourceConfig(d)
				tbl := "source." + d
				walk(tbl+".", reflect.TypeOf(c), func(line string) string { return top("[" + tbl + "]\n" + line) })
			}
		default:
			n := name
			walk(n+".", ft, func(line string) string { return top("[" + n + "]\n" + line) })
		}
	}
	// [[output]] and [[input]]: driver (+ first_line) and the driver's table.
	entry := func(kind, d string) func(string) string {
		return func(line string) string { return fmt.Sprintf("[[%s]]\ndriver = %q\n%s\n", kind, d, line) }
	}
	for _, kind := range []string{"output", "input"} {
		var names []string
		newCfg := func(string) any { return nil }
		if kind == "output" {
			names = drivers.SinkNames()
			newCfg = func(n string) any { c, _ := drivers.NewSinkConfig(n); return c }
		} else {
			names = drivers.InputNames()
			newCfg = func(n string) any { c, _ := drivers.NewInputConfig(n); return c }
			keys = append(keys, configKey{path: "input.first_line", typ: reflect.TypeOf(0), doc: entry("input", names[0])})
		}
		keys = append(keys, configKey{path: kind + ".driver", typ: reflect.TypeOf(""), doc: func(line string) string { return fmt.Sprintf("[[%s]]\n%s\n", kind, line) }})
		for _, d := range names {
			tbl := kind + "." + d
			head := entry(kind, d)
			walk(tbl+".", reflect.TypeOf(newCfg(d)), func(line string) string { return head("[" + tbl + "]\n" + line) })
		}
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i].path < keys[j].path })
	return keys
}

func leaf(path string) string { return path[strings.LastIndexByte(path, '.')+1:] }

// wrongValue is a TOML value of the wrong type for typ, and the form the
// error must ask for.
func wrongValue(typ reflect.Type) (value, form string) {
	for typ.Kind() == reflect.Pointer {
		typ = typ.Elem()
	}
	switch typ.Kind() {
	case reflect.String:
		return "5", "expected a quoted string"
	case reflect.Bool:
		return `"yes"`, "expected true or false"
	case reflect.Int, reflect.Int64, reflect.Int32, reflect.Uint16, reflect.Uint8:
		return `"many"`, "expected a whole number"
	case reflect.Float64, reflect.Float32:
		return `"fast"`, "expected a number"
	case reflect.Slice:
		if typ.Elem().Kind() == reflect.String {
			return `"one"`, "expected a list of quoted strings"
		}
		return `"one"`, "expected a list of whole numbers"
	}
	return "", ""
}

// Every key of the configuration, given a value of the wrong type, is
// refused with the file, the line, the key and the form it takes.
func TestBadConfigEveryKeyWrongType(t *testing.T) {
	keys := configKeys(t)
	if len(keys) < 60 {
		t.Fatalf("the walk found only %d keys: %v", len(keys), keys)
	}
	for _, k := range keys {
		value, form := wrongValue(k.typ)
		if value == "" {
			t.Errorf("%s: no wrong value for type %s: add one to wrongValue", k.path, k.typ)
			continue
		}
		t.Run(k.path, func(t *testing.T) {
			doc := k.doc(leaf(k.path) + " = " + value)
			line := strings.Count(doc, "\n")
			_, err := ParseConfig("bad.toml", []byte(doc))
			if err == nil {
				t.Fatalf("accepted:\n%s", doc)
			}
			for _, want := range []string{fmt.Sprintf("bad.toml:%d:", line), leaf(k.path), form} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("%q lacks %q\n%s", err, want, doc)
				}
			}
		})
	}
}

// typo makes a misspelling of key that is no key: the last two letters
// swapped, or a letter doubled when they are the same.
func typo(key string) string {
	b := []byte(key)
	n := len(b)
	if n >= 2 && b[n-1] != b[n-2] {
		b[n-1], b[n-2] = b[n-2], b[n-1]
		return string(b)
	}
	return key + key[n-1:]
}

// Every key, misspelt, is refused as unknown, with its line, the keys its
// table takes, and the key meant.
func TestBadConfigEveryKeyMisspelt(t *testing.T) {
	for _, k := range configKeys(t) {
		t.Run(k.path, func(t *testing.T) {
			bad := typo(leaf(k.path))
			value, _ := wrongValue(k.typ) // decoding stops at the unknown key first
			doc := k.doc(bad + " = " + value)
			line := strings.Count(doc, "\n")
			_, err := ParseConfig("bad.toml", []byte(doc))
			if err == nil {
				t.Fatalf("accepted:\n%s", doc)
			}
			msg := err.Error()
			for _, want := range []string{fmt.Sprintf("bad.toml:%d:", line), bad, "unknown key", "did you mean " + leaf(k.path) + "?"} {
				if !strings.Contains(msg, want) {
					t.Errorf("%q lacks %q\n%s", msg, want, doc)
				}
			}
		})
	}
	// An unknown table, and a key outside any table.
	for doc, want := range map[string]string{
		"[recordings]\nparent_directory = \"x\"\n":    "did you mean recording?",
		"drivr = \"sim\"\n":                           "the top level takes source, pipeline",
		"[source]\ndriver = \"sim\"\n[source.simm]\n": "did you mean sim?",
	} {
		if _, err := ParseConfig("bad.toml", []byte(doc)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want %q", doc, err, want)
		}
	}
}

// rangeCases are the out-of-range values of every key that has a range or
// a set of allowed values: each must be refused naming the key (and its
// line) and saying what is allowed (want).
var rangeCases = map[string][]struct{ value, want string }{
	"control.http":                    {{`"localhost"`, "host:port"}, {`"127.0.0.1:70000"`, "port 0–65535"}, {`"0.0.0.0:37497"`, "allow_remote"}, {`":37497"`, "allow_remote"}, {`"[::]:37497"`, "allow_remote"}},
	"control.start_mode":              {{`"go"`, "idle, acquire or record"}},
	"control.socket":                  {{`"/` + strings.Repeat("s", 120) + `"`, "at most 107"}},
	"control.allow_remote":            {{`true`, "needs token_file"}},
	"log.level":                       {{`"loud"`, "debug, info, warn or error"}},
	"log.format":                      {{`"xml"`, "auto, console or json"}},
	"pipeline.block_ms":               {{"0", "> 0"}, {"-1", "> 0"}, {"nan", "> 0"}, {"20000", "≤ 10000"}},
	"pipeline.block_samples":          {{"-1", "at least 1"}, {"2000000", "1–1048576"}},
	"pipeline.queue_ms":               {{"0", "> 0"}, {"-5", "> 0"}, {"inf", "≤ 60000"}, {"1e9", "≤ 60000"}},
	"pipeline.preset":                 {{`"fast"`, "closed_loop"}},
	"python.block_timeout_ms":         {{"-1", "≥ 0"}, {"nan", "0–3600000"}},
	"python.switch_interval_us":       {{"-1", "> 0"}, {"1e7", "0–1e+06"}},
	"python.venv":                     {{`"/opt/venv"` + "\nexecutable = \"/usr/bin/python3\"", "not both"}},
	"realtime.priority":               {{"-1", "1–99"}, {"100", "1–99"}},
	"realtime.cpus":                   {{"[-1]", "0–1023"}, {"[5000]", "0–1023"}, {"[1, 1]", "listed twice"}},
	"recording.parent_directory":      {{`""`, "must not be empty"}, {`"a\u0000b"`, "NUL"}},
	"recording.record_node_id":        {{"-3", "≥ 1"}, {"100", "is taken"}},
	"recording.flush_ms":              {{"5", "10–60000"}, {"70000", "10–60000"}},
	"recording.fsync":                 {{`"always"`, `use "checkpoint"`}},
	"stage.module":                    {{`""`, "missing"}},
	"stage.on_error":                  {{`"explode"`, `"continue" or "disable"`}},
	"stage.isolation":                 {{`"thread"`, `use "none"`}},
	"source.driver":                   {{`"nidaq"`, "use one of"}},
	"output.driver":                   {{`"laser"`, "use one of"}},
	"input.driver":                    {{`"laser"`, "use one of"}},
	"input.first_line":                {{"-1", "0–63"}, {"64", "0–63"}},
	"source.sim.channels":             {{"0", "1–4096"}, {"5000", "1–4096"}},
	"source.sim.rate":                 {{"10", "1000–100000"}, {"200000", "1000–100000"}},
	"source.sim.noise_uv":             {{"-1", "0–1000"}, {"nan", "0–1000"}},
	"source.sim.lfp_uv":               {{"-1", "0–5000"}},
	"source.sim.units":                {{"-1", "0–256"}, {"1000", "0–256"}},
	"source.sim.spike_channels":       {{"[0]", "channel number"}, {"[99]", "channel number"}},
	"source.sim.plant_channels":       {{"[0]", "channel number"}, {"[33]", "channel number 1–32"}},
	"source.sim.plant_uv":             {{"-1", "0–10000"}},
	"source.sim.plant_rate":           {{"0", "> 0"}, {"1e6", "at most"}},
	"source.openbci.baud":             {{"0", "line rate"}},
	"source.openbci.gain":             {{"[3, 3, 3, 3, 3, 3, 3, 3]", "1, 2, 4, 6, 8, 12, 24"}},
	"source.openbci.timeout_ms":       {{"5", "100–60000"}},
	"source.spikerbox.baud":           {{"-1", "line rate"}},
	"source.spikerbox.channels":       {{"0", "must be 1–"}},
	"source.spikerbox.rate":           {{"1", "Hz"}},
	"source.spikerbox.bits":           {{"40", "must be"}},
	"source.spikerbox.scale_uv":       {{"0", "> 0"}},
	"source.spikerbox.event_pulse_ms": {{"0", "> 0"}, {"5000", "≤ 1000"}},
	"output.pulsepal.high_volts":      {{"12", "−10…+10 V"}},
	"output.pulsepal.low_volts":       {{"-11", "−10…+10 V"}},
	"output.pulsepal.map.channel":     {{"9", "channels 1–4"}},
	"output.pulsepal.map.line":        {{"300", "0–255"}},
	"output.pulsepal.map.mode":        {{`"blink"`, `"level" or "trigger"`}},
	"output.ftdi.vid":                 {{"0", "16-bit USB ids"}, {"70000", "16-bit USB ids"}},
	"output.ftdi.pid":                 {{"-1", "16-bit USB ids"}},
	"output.ftdi.interface":           {{`"Z"`, "interface"}},
	"output.ftdi.pulse_ms":            {{"0", "> 0"}},
	"output.ftdi.map.channel":         {{"8", "channels 0–7"}},
	"output.ftdi.map.line":            {{"-1", "0–255"}},
	"output.ftdi.map.mode":            {{`"blink"`, `"level" or "trigger"`}},
	// [spikes]: the detector's own Validate, run when the file is read.
	"spikes.auto_group":              {{"-1", "channels per electrode"}},
	"spikes.dead_time_ms":            {{"-1", "milliseconds"}},
	"spikes.highpass_hz":             {{"-1", "≥ 0 Hz"}},
	"spikes.noise_update_s":          {{"0", "0.01–3600"}},
	"spikes.noise_window_s":          {{"0", "0.1–3600"}},
	"spikes.peak_search_samples":     {{"0", "must be 1–"}},
	"spikes.polarity":                {{`"up"`, `"negative", "positive" or "both"`}},
	"spikes.pre_peak_samples":        {{"-1", "less than waveform_samples"}},
	"spikes.threshold_mad":           {{"0", "> 0"}},
	"spikes.threshold_uv":            {{"-5", "> 0 µV"}},
	"spikes.waveform_samples":        {{"1", "must be 2–"}},
	"spikes.electrode.channels":      {{"[0]", "start at 1"}, {"[1, 1]", "listed twice"}, {"[99]", "does not exist"}},
	"spikes.electrode.name":          {{`"a/b"`, "may not contain"}},
	"spikes.electrode.polarity":      {{`"up"`, `"negative", "positive" or "both"`}},
	"spikes.electrode.threshold_mad": {{"0", "> 0"}},
	"spikes.electrode.threshold_uv":  {{"0", "> 0 µV"}},
	"source.stream.transport":        {{`"pigeon"`, `"serial" or "usb"`}},
	"source.stream.baud":             {{"-1", "must be positive"}},
	"source.stream.timeout_ms":       {{"5", "10–60000"}},
	"source.stream.vid":              {{"-1", "0–0xffff"}},
	"source.stream.pid":              {{"70000", "0–0xffff"}},
	"source.stream.interface":        {{"300", "0–255"}},
	"source.stream.endpoint_in":      {{"1", "IN endpoint"}},
	"source.stream.endpoint_out":     {{"129", "OUT endpoint"}},
}

// noRange are the keys that have no range to check here, and why. A key
// the walk finds that is in neither map fails the test: decide.
var noRange = map[string]string{
	"control.token_file":           "a path: checked on this machine (TestBadConfigFiles)",
	"control.socket_group":         "a group name: checked on this machine (TestBadConfigFiles)",
	"control.module_dirs":          "paths: checked on this machine (TestBadConfigFiles)",
	"control.recording_dirs":       "paths; a folder that does not exist yet is allowed (recordings create it)",
	"python.executable":            "a path or a command name: checked when Python starts",
	"recording.record_on_start":    "a bool",
	"stage.name":                   "free text, shown in logs",
	"source.playback.path":         "a path: the driver checks it when it opens the recording",
	"source.playback.stream":       "a stream name of the recording: checked when it is opened",
	"source.sim.seed":              "any whole number selects a data set",
	"source.openbci.path":          "a device path: checked when the port is opened (empty is refused by Validate)",
	"source.spikerbox.path":        "a device path: checked when the port is opened (empty is refused by Validate)",
	"source.stream.path":           "a device path: checked when the port is opened",
	"source.stream.serial_number":  "free text matched against the device's",
	"output.pulsepal.path":         "a device path: checked when the port is opened (empty is refused by Check)",
	"output.pulsepal.map.from":     "python, input or a stage's name: names are free",
	"output.pulsepal.map.pulse_ms": "ignored by Pulse Pal (its pulses are programmed on the device)",
	"output.ftdi.serial_number":    "free text matched against the device's",
	"output.ftdi.map.from":         "python, input or a stage's name: names are free",
	"output.ftdi.map.pulse_ms":     "0 means the driver's pulse_ms; checked when the device opens",
	// Drivers without a Validate/Check of their own: their values are
	// checked when the device is opened (see docs/BAD-INPUT.md).
	"output.firmata.path":          "firmata has no exported check: checked when the board is opened",
	"output.firmata.baud":          "firmata has no exported check: checked when the board is opened",
	"output.firmata.reset_wait_ms": "firmata has no exported check: checked when the board is opened",
	"output.firmata.pulse_ms":      "firmata has no exported check: checked when the board is opened",
	"output.firmata.report_inputs": "firmata has no exported check: checked when the board is opened",
	"output.firmata.map.from":      "firmata has no exported check: checked when the board is opened",
	"output.firmata.map.line":      "firmata has no exported check: checked when the board is opened",
	"output.firmata.map.channel":   "firmata has no exported check: checked when the board is opened",
	"output.firmata.map.mode":      "firmata has no exported check: checked when the board is opened",
	"output.firmata.map.pulse_ms":  "firmata has no exported check: checked when the board is opened",
	"input.firmata.path":           "firmata has no exported check: checked when the board is opened",
	"input.firmata.baud":           "firmata has no exported check: checked when the board is opened",
	"input.firmata.reset_wait_ms":  "firmata has no exported check: checked when the board is opened",
	"input.firmata.pins":           "firmata has no exported check: checked when the board is opened",
	"input.ftdi.vid":               "the ftdi input has no check of its own: checked when the chip is opened",
	"input.ftdi.pid":               "the ftdi input has no check of its own: checked when the chip is opened",
	"input.ftdi.serial_number":     "free text matched against the device's",
	"input.ftdi.interface":         "the ftdi input has no check of its own: checked when the chip is opened",
	"input.ftdi.mode":              "the ftdi input has no check of its own: checked when the chip is opened",
}

// rangeDoc is a document that is valid but for the key's value: the
// drivers whose tables are checked need their other required keys.
func rangeDoc(k configKey, value string) string {
	line := leaf(k.path) + " = " + value
	switch {
	case strings.HasPrefix(k.path, "source.") && k.path != "source.driver":
		d := strings.Split(k.path, ".")[1]
		doc := fmt.Sprintf("[source]\ndriver = %q\n[source.%s]\n", d, d)
		if d == "openbci" || d == "spikerbox" {
			doc += "path = \"/dev/ttyUSB0\"\n"
		}
		switch leaf(k.path) {
		case "vid", "pid", "interface", "endpoint_in", "endpoint_out":
			if d == "stream" {
				doc += "transport = \"usb\"\n"
			}
		}
		return doc + line + "\n"
	case strings.HasPrefix(k.path, "output.") && k.path != "output.driver":
		d := strings.Split(k.path, ".")[1]
		doc := fmt.Sprintf("[[output]]\ndriver = %q\n[output.%s]\n", d, d)
		if d == "pulsepal" {
			doc += "path = \"/dev/ttyACM0\"\n"
		}
		mapLine := "line = 0\nchannel = 1\n"
		if strings.Contains(k.path, ".map.") {
			// The mapping's other keys first, the tested one last.
			mapLine = strings.ReplaceAll(mapLine, leaf(k.path)+" = ", "# ")
			return doc + fmt.Sprintf("[[output.%s.map]]\n%s%s\n", d, mapLine, line)
		}
		return doc + line + "\n" + fmt.Sprintf("[[output.%s.map]]\n%s", d, mapLine)
	case strings.HasPrefix(k.path, "spikes.electrode."):
		doc := "[spikes]\n[[spikes.electrode]]\n"
		if k.path != "spikes.electrode.channels" {
			doc += "channels = [1]\n"
		}
		return doc + line + "\n"
	case strings.HasPrefix(k.path, "spikes.") && k.path != "spikes.auto_group":
		return "[spikes]\nauto_group = 4\n" + line + "\n"
	case k.path == "stage.module":
		return "[[stage]]\n" + line + "\n"
	case strings.HasPrefix(k.path, "stage."):
		return "[[stage]]\nmodule = \"m.py\"\n" + line + "\n"
	case k.path == "control.allow_remote":
		return "[control]\nhttp = \"0.0.0.0:37497\"\n" + line + "\n"
	}
	return k.doc(line)
}

// Every key with a range or a set of allowed values, given a value outside
// it, is refused naming the key, its line and what is allowed; every other
// key is listed in noRange with the reason it has none.
func TestBadConfigEveryKeyOutOfRange(t *testing.T) {
	walked := map[string]bool{}
	for _, k := range configKeys(t) {
		walked[k.path] = true
		cases, ok := rangeCases[k.path]
		if !ok {
			if _, no := noRange[k.path]; !no && k.typ.Kind() != reflect.Bool {
				t.Errorf("key %s (%s) has no out-of-range case: add one to rangeCases, or say in noRange why it has no range", k.path, k.typ)
			}
			continue
		}
		for _, c := range cases {
			t.Run(k.path+"="+c.value, func(t *testing.T) {
				doc := rangeDoc(k, c.value)
				_, err := ParseConfig("bad.toml", []byte(doc))
				if err == nil {
					t.Fatalf("accepted:\n%s", doc)
				}
				var ce *ConfigError
				if !asConfigError(err, &ce) {
					t.Fatalf("%v is not a ConfigError", err)
				}
				if !strings.Contains(ce.Key, leaf(k.path)) && !strings.Contains(ce.Msg, leaf(k.path)) {
					t.Errorf("%q does not name %s", err, leaf(k.path))
				}
				if ce.Line == 0 && !strings.HasPrefix(k.path, "stage.module") {
					t.Errorf("%q has no line\n%s", err, doc)
				}
				if !strings.Contains(err.Error(), c.want) {
					t.Errorf("%q lacks %q\n%s", err, c.want, doc)
				}
			})
		}
	}
	for k := range rangeCases {
		if !walked[k] {
			t.Errorf("rangeCases has %s, which is no key of the configuration", k)
		}
	}
	for k := range noRange {
		if !walked[k] {
			t.Errorf("noRange has %s, which is no key of the configuration", k)
		}
	}
}

func asConfigError(err error, ce **ConfigError) bool {
	e, ok := err.(*ConfigError)
	*ce = e
	return ok
}

// The checks LoadConfig makes on this machine: a module that is missing, a
// folder, not a regular file, or outside module_dirs (also through a
// symbolic link); module_dirs that are not folders; an unreadable token
// file; an unknown socket group.
func TestBadConfigFiles(t *testing.T) {
	dir := t.TempDir()
	mods := filepath.Join(dir, "modules")
	os.MkdirAll(filepath.Join(mods, "folder.py"), 0o755)
	os.WriteFile(filepath.Join(mods, "ok.py"), []byte(passThrough), 0o644)
	outside := filepath.Join(dir, "elsewhere.py")
	os.WriteFile(outside, []byte(passThrough), 0o644)
	os.Symlink(outside, filepath.Join(mods, "link.py"))
	cases := []struct{ name, doc, want string }{
		{"missing module", "[[stage]]\nmodule = \"modules/nope.py\"\n", "stage[1].module: " + filepath.Join(mods, "nope.py") + ": no such file"},
		{"folder for a module", "[[stage]]\nmodule = \"modules/folder.py\"\n", "is a folder, not a Python file"},
		{"device for a module", "[[stage]]\nmodule = \"/dev/null\"\n", "is not a regular file"},
		{"module outside module_dirs", fmt.Sprintf("[[stage]]\nmodule = %q\n[control]\nmodule_dirs = [\"modules\"]\n", outside), "outside the folders modules may be loaded from"},
		{"link out of module_dirs", "[[stage]]\nmodule = \"modules/link.py\"\n[control]\nmodule_dirs = [\"modules\"]\n", "is a link to " + outside},
		{"module_dirs not a folder", "[control]\nmodule_dirs = [\"modules/ok.py\"]\n", "module_dirs[1] = " + filepath.Join(mods, "ok.py") + " is not a folder"},
		{"token file missing", "[control]\nhttp = \"0.0.0.0:0\"\nallow_remote = true\ntoken_file = \"nope\"\n", "control.token_file"},
		{"socket group unknown", "[control]\nsocket_group = \"no-such-group-ephysd\"\n", "groupadd"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(dir, "ephysd.toml")
			os.WriteFile(path, []byte(c.doc), 0o644)
			_, err := LoadConfig(path)
			if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), path+":") {
				t.Fatalf("%v, want %q", err, c.want)
			}
		})
	}
	// The good one loads.
	path := filepath.Join(dir, "ephysd.toml")
	os.WriteFile(path, []byte("[[stage]]\nmodule = \"modules/ok.py\"\n[control]\nmodule_dirs = [\"modules\"]\n"), 0o644)
	if _, err := LoadConfig(path); err != nil {
		t.Fatal(err)
	}
}
