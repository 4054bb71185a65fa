package daemon

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/ephysd/ephysd/drivers/sim"
)

func TestConfigDefaultsAndPaths(t *testing.T) {
	cfg, err := ParseConfig("/etc/ephysd/ephysd.toml", []byte(`
[source]
driver = "sim"
[source.sim]
channels = 64
[[stage]]
module = "filters/bp.py"
[[stage]]
module = "/abs/closed_loop.py"
on_error = "disable"
`))
	if err != nil {
		t.Fatal(err)
	}
	sc, ok := cfg.Driver.(*sim.Config)
	if !ok || sc.Channels != 64 || sc.Rate != 30000 {
		t.Fatalf("driver config %#v", cfg.Driver)
	}
	if cfg.Stages[0].Module != "/etc/ephysd/filters/bp.py" || cfg.Stages[1].Module != "/abs/closed_loop.py" {
		t.Fatalf("module paths %+v", cfg.Stages)
	}
	if cfg.Recording.ParentDirectory != "/etc/ephysd/recordings" || cfg.Pipeline.BlockMS != 1 || cfg.Control.StartMode != "idle" ||
		cfg.Control.HTTP != "127.0.0.1:37497" || len(cfg.Control.ModuleDirs) != 2 {
		t.Fatalf("defaults %+v", cfg)
	}
}

func TestConfigErrorsNameKeyLineAndForm(t *testing.T) {
	cases := []struct {
		name, doc string
		want      []string
	}{
		{"unknown key", "[source]\ndriver = \"sim\"\n[source.sim]\nchanels = 3\n", []string{"x.toml:4", "source.sim.chanels", "unknown key"}},
		{"unknown table", "[sources]\ndriver = \"sim\"\n", []string{"x.toml:1", "sources", "unknown key"}},
		{"wrong type", "[source.sim]\nchannels = \"many\"\n", []string{"x.toml:2", "channels", "whole number"}},
		{"float for int", "[source.sim]\nchannels = 3.5\n", []string{"x.toml:2", "channels", "whole number"}},
		{"bool", "[recording]\nrecord_raw = 1\n", []string{"x.toml:2", "record_raw", "true or false"}},
		{"unknown driver", "[source]\ndriver = \"nidaq\"\n", []string{"x.toml:2", "source.driver", `unknown driver "nidaq"`, "sim"}},
		{"bad block", "[pipeline]\nblock_ms = 0\n", []string{"x.toml:2", "pipeline.block_ms", "> 0"}},
		{"bad on_error", "[[stage]]\nmodule = \"a.py\"\non_error = \"explode\"\n", []string{"x.toml:3", "stage[1].on_error", "continue"}},
		{"stage without module", "[[stage]]\nname = \"x\"\n", []string{"stage[1].module", "missing"}},
		{"both pythons", "[python]\nexecutable = \"/usr/bin/python3\"\nvenv = \"/opt/venv\"\n", []string{"python.venv", "not both"}},
		{"syntax", "[source\n", []string{"x.toml:1"}},
		{"bad log level", "[log]\nlevel = \"loud\"\n", []string{"x.toml:2", "log.level"}},
		{"remote without opt-in", "[control]\nhttp = \"0.0.0.0:37497\"\n", []string{"x.toml:2", "control.http", "allow_remote"}},
		{"remote without token", "[control]\nhttp = \"0.0.0.0:37497\"\nallow_remote = true\n", []string{"control.allow_remote", "token_file"}},
		{"bad start mode", "[control]\nstart_mode = \"go\"\n", []string{"control.start_mode"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseConfig("x.toml", []byte(c.doc))
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}

func TestShippedExampleConfigLoads(t *testing.T) {
	cfg, err := LoadConfig(filepath.Join("..", "examples", "ephysd.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Stages) == 0 || cfg.Source.Driver != "sim" {
		t.Fatalf("%+v", cfg)
	}
}
