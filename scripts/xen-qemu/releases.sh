# shellcheck shell=bash
# releases.sh: the Debian releases the real-Xen harness boots, sourced by fetch-debs.sh, e2e.sh
# and demo.sh. A release's packages are listed in pkgs/<release>-<debarch>.txt; they are fetched
# with a private apt configuration per release (fetch-debs.sh), so the host's own apt sources,
# lists and architectures stay as they are.

# Every release, in the order a run boots them.
XV_RELEASES="bookworm trixie"

# release_known NAME: true when NAME is a release of XV_RELEASES.
release_known() {
  case " $XV_RELEASES " in *" $1 "*) return 0 ;; esac
  return 1
}

# release_debian NAME: Debian's version number of the release.
release_debian() {
  case $1 in bookworm) echo 12 ;; trixie) echo 13 ;; *) return 1 ;; esac
}

# release_xen NAME: the Xen series the release packages (xen-hypervisor-<series>-<debarch>).
release_xen() {
  case $1 in bookworm) echo 4.17 ;; trixie) echo 4.20 ;; *) return 1 ;; esac
}

# release_kernel NAME: the Linux series of the release's linux-image-<debarch>.
release_kernel() {
  case $1 in bookworm) echo 6.1 ;; trixie) echo 6.12 ;; *) return 1 ;; esac
}

# release_words LIST: LIST ("all" or '+'/','/' '-separated names) as space-separated releases;
# fails on an unknown name.
release_words() {
  local r out=
  [ "$1" != all ] || { echo "$XV_RELEASES"; return 0; }
  for r in ${1//[+,]/ }; do
    release_known "$r" || return 1
    out="$out $r"
  done
  [ -n "$out" ] || return 1
  echo "${out# }"
}

# apt_private APTDIR RELEASE DEBARCH: set up the private apt configuration of RELEASE in APTDIR
# (its sources list, lists, cache and an empty dpkg status; Debian's archive keyring) and set
# the array APT_OPTS that points apt-get and apt-cache at it for DEBARCH. Fails, saying so, when
# the keyring is missing.
apt_private() {
  local dir=$1 rel=$2 arch=$3 keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  [ -f "$keyring" ] || { echo "$keyring missing (apt-get install debian-archive-keyring)" >&2; return 1; }
  mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/parts"
  : >"$dir/status"
  {
    echo "deb [signed-by=$keyring] http://deb.debian.org/debian $rel main"
    echo "deb [signed-by=$keyring] http://deb.debian.org/debian $rel-updates main"
    echo "deb [signed-by=$keyring] http://deb.debian.org/debian-security $rel-security main"
  } >"$dir/sources.list"
  # shellcheck disable=SC2034 # for the sourcing script
  APT_OPTS=(-o "Dir::Etc::SourceList=$dir/sources.list" -o "Dir::Etc::SourceParts=$dir/parts"
    -o "Dir::Etc::Preferences=/dev/null" -o "Dir::Etc::PreferencesParts=$dir/parts"
    -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir/cache" -o "Dir::State::status=$dir/status"
    -o "APT::Architecture=$arch" -o "APT::Architectures::=$arch" -o "Acquire::Languages=none")
}
