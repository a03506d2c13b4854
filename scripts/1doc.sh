#!/usr/bin/env bash
# 1-DOC: root, cluster and worker on this machine with one command. Arrives with the 1-DOC issue (issue 7), once
# root-service, cluster-service, NodeEngine and NetManager are implemented.
set -euo pipefail
echo "scripts/1doc.sh: coming with the 1-DOC issue; root-service, cluster-service, NodeEngine and NetManager are not implemented yet" >&2
exit 2
