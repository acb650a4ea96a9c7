// Defaults shared by the daemon and its clients, so a client finds the local daemon with no
// configuration on either side.
#ifndef KVDN_COMMON_DEFAULTS_H_
#define KVDN_COMMON_DEFAULTS_H_

#include <string>

namespace kvdn {

// /var/lib/kvdn as root; else $XDG_DATA_HOME/kvdn, ~/.local/share/kvdn, or /tmp/kvdn.
std::string DefaultDataDir();
// <DefaultDataDir()>/kvdnd.sock: where kvdnd listens and clients connect by default.
std::string DefaultUnixSocket();

}  // namespace kvdn

#endif  // KVDN_COMMON_DEFAULTS_H_
