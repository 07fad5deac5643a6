# Sourced by test brokers in the tool-broker image (`. /usr/bin/device-env`): the agent gives each
# device property as NAME_<INSTANCE HASH> (Akri's naming, so one container can hold several
# devices); this exports each one under its plain NAME too. Values must not hold single quotes.
eval "$(env | sed -n "s/^\([A-Z][A-Z0-9_]*\)_[0-9A-F]\{6\}=\(.*\)\$/export \1='\2'/p")"
