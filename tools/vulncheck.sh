#!/usr/bin/env bash
# vulncheck.sh — the vulnerability check of `make test`.
#
# Runs govulncheck (golang.org/x/vuln/cmd/govulncheck at a pinned version,
# built from the Go module proxy) over ./... and fails when code ephysd
# calls has a known vulnerability. A vulnerability in a package ephysd
# imports but whose vulnerable functions it never calls is reported, not
# failed.
#
# First it proves that the gate works: against a two-entry database it
# writes itself, govulncheck must fail for a vulnerable function ephysd
# calls (zap's Logger.Warn, called by the pipeline) and let pass one that
# ephysd only imports. A gate that cannot fail is no gate.
#
# The vulnerability database, the first that can be had:
#   1. $EPHYSD_VULNDB: a URL (https://…) or a folder (a govulncheck v1
#      database, or a flat folder of OSV .json entries such as vulndb's
#      data/osv), when set;
#   2. https://vuln.go.dev, when this machine reaches it;
#   3. data/osv of the golang.org/x/vulndb module at $VULNDB_VERSION, from
#      the Go module proxy (`go mod download`; Go caches it).
# It prints which database it checked against and how recent it is. When
# none can be had it prints NOT CHECKED and why, and passes — unless
# EPHYSD_VULNCHECK_REQUIRED=1, which makes that a failure.
#
# Exit status: 0 checked and clean (or not checked, not required), 1 a
# vulnerability in code ephysd calls, or the check itself failed.
set -euo pipefail
cd "$(dirname "$0")/.."

GO=${GO:-go}
GOVULNCHECK_VERSION=${GOVULNCHECK_VERSION:-v1.8.0} # the newest that builds with Go 1.26 from the proxy
VULNDB_VERSION=${VULNDB_VERSION:-v0.0.0-20240626230022-4408037c1739}
ONLINE_DB=https://vuln.go.dev

say() { printf 'vulncheck: %s\n' "$*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/ephysd-vulncheck.XXXXXX")
trap 'rm -rf "$work"' EXIT

# govulncheck itself, built once per version into the user's cache.
bindir="${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/ephysd/govulncheck-$GOVULNCHECK_VERSION"
gv="$bindir/govulncheck"
if [ ! -x "$gv" ]; then
	mkdir -p "$bindir"
	GOBIN="$bindir" GOFLAGS=-mod=mod "$GO" install "golang.org/x/vuln/cmd/govulncheck@$GOVULNCHECK_VERSION" ||
		fail "could not build govulncheck $GOVULNCHECK_VERSION from the Go module proxy"
fi

# run DB PATTERN…: govulncheck's exit status (0 clean, 3 vulnerable code
# is called), its output in $work/out.
run() {
	local db=$1
	shift
	set +e
	"$gv" -db "$db" "$@" >"$work/out" 2>&1
	local rc=$?
	set -e
	return $rc
}

# --- the gate's self-test -------------------------------------------------
selftest="$work/selftest-db"
mkdir -p "$selftest"
entry() { # id symbol summary
	cat >"$selftest/$1.json" <<EOF
{"schema_version": "1.3.1", "id": "$1", "modified": "2099-01-01T00:00:00Z", "published": "2099-01-01T00:00:00Z",
 "summary": "$3", "details": "$3",
 "affected": [{"package": {"name": "go.uber.org/zap", "ecosystem": "Go"},
   "ranges": [{"type": "SEMVER", "events": [{"introduced": "0"}, {"fixed": "99.0.0"}]}],
   "ecosystem_specific": {"imports": [{"path": "go.uber.org/zap", "symbols": ["$2"]}]}}],
 "database_specific": {"url": "https://pkg.go.dev/vuln/$1"}}
EOF
}
entry GO-2099-0001 Logger.Warn "vulncheck self-test: a vulnerable function ephysd calls"
entry GO-2099-0002 Logger.NoSuchMethodEphysd "vulncheck self-test: a vulnerable function ephysd does not call"
rc=0
run "file://$selftest" ./pipeline || rc=$?
if [ $rc -ne 3 ] || ! grep -q 'Vulnerability #1: GO-2099-0001' "$work/out" || grep -q 'Vulnerability #.*GO-2099-0002' "$work/out"; then
	cat "$work/out" >&2
	fail "self-test: govulncheck $GOVULNCHECK_VERSION exited $rc; it must exit 3 for GO-2099-0001 (called) and not list GO-2099-0002 (imported, not called)"
fi
say "self-test passed: govulncheck $GOVULNCHECK_VERSION fails on a vulnerable function ephysd calls, not on one it only imports"

# --- the database -----------------------------------------------------------
why_not=()
# dbmodified FOLDER: the newest "modified" date of a folder of OSV entries.
dbmodified() {
	local dir=$1
	[ -d "$dir/ID" ] && dir="$dir/ID"
	find "$dir" -maxdepth 1 -name '*.json' -print0 | xargs -0 grep -ho '"modified": *"[^"]*"' 2>/dev/null |
		sed 's/.*"\([^"]*\)"$/\1/' | sort | tail -1
}

check() { # DB DESCRIPTION
	local rc=0
	run "$1" ./... || rc=$?
	case $rc in
	0)
		sed -n '/=== Symbol Results ===/,$p' "$work/out" >&2
		say "checked ./... with govulncheck $GOVULNCHECK_VERSION against $2: no known vulnerability in code ephysd calls"
		exit 0
		;;
	3)
		cat "$work/out" >&2
		fail "govulncheck $GOVULNCHECK_VERSION against $2: code ephysd calls has a known vulnerability (above): update the module or Go, or stop calling the function"
		;;
	esac
	return $rc
}

if [ -n "${EPHYSD_VULNDB:-}" ]; then
	db=$EPHYSD_VULNDB
	case $db in
	*://*) desc="$db (EPHYSD_VULNDB)" ;;
	*)
		[ -d "$db" ] || fail "EPHYSD_VULNDB=$db is not a folder"
		desc="$db (EPHYSD_VULNDB, newest entry $(dbmodified "$db"))"
		db="file://$(cd "$db" && pwd)"
		;;
	esac
	check "$db" "$desc" || { cat "$work/out" >&2; fail "govulncheck could not check against $desc"; }
fi

if getent hosts "${ONLINE_DB#https://}" >/dev/null 2>&1; then
	if check "$ONLINE_DB" "$ONLINE_DB (the live Go vulnerability database)"; then :; else
		why_not+=("$ONLINE_DB: $(grep -m1 -iE 'error|fetch|dial|timeout' "$work/out" || echo 'govulncheck failed')")
	fi
else
	why_not+=("$ONLINE_DB: this machine cannot resolve its name")
fi

# The golang.org/x/vulndb module through the module proxy.
if dl=$(cd "$work" && GOFLAGS=-mod=mod "$GO" mod download -json "golang.org/x/vulndb@$VULNDB_VERSION" 2>&1); then
	dir=$(printf '%s\n' "$dl" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')
	if [ -d "$dir/data/osv" ]; then
		check "file://$dir/data/osv" "golang.org/x/vulndb@$VULNDB_VERSION data/osv (newest entry $(dbmodified "$dir/data/osv"); set VULNDB_VERSION for a newer one)" ||
			why_not+=("golang.org/x/vulndb@$VULNDB_VERSION: govulncheck failed on it: $(head -1 "$work/out")")
	else
		why_not+=("golang.org/x/vulndb@$VULNDB_VERSION: the module has no data/osv folder")
	fi
else
	why_not+=("golang.org/x/vulndb@$VULNDB_VERSION from the module proxy: $(printf '%s' "$dl" | grep -m1 -E '"Error"|server response|not available' | sed 's/^[[:space:]]*//' || echo 'download failed')")
fi

say "=================================================================="
say "NOT CHECKED: ./... was not checked against any vulnerability database."
for w in "${why_not[@]}"; do say "  - $w"; done
say "  To check, set EPHYSD_VULNDB to a copy of the database (a folder of OSV"
say "  .json entries, e.g. the data/osv folder of a golang.org/x/vulndb checkout)"
say "  or run where vuln.go.dev is reachable."
say "=================================================================="
if [ "${EPHYSD_VULNCHECK_REQUIRED:-0}" = 1 ]; then
	fail "EPHYSD_VULNCHECK_REQUIRED=1 and no vulnerability database could be had"
fi
exit 0
