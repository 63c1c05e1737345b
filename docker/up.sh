#!/usr/bin/env bash
# `make up`: run the chain with `docker compose up`, then say whether every job of it finished, and exit non-zero
# when one did not. `docker compose up` alone exits 0 when a job fails and the jobs after it never start.
#     docker/up.sh [compose options: -f FILE, --profile NAME, ...]
# COMPOSE names the compose command (default: docker compose).
set -uo pipefail
read -r -a compose <<< "${COMPOSE:-docker compose}"
compose+=("$@")

"${compose[@]}" up
up_status=$?

# One line per job of the chain: its container's state and exit code. Compose creates every job's container
# before it starts the first one, so a job that never ran is "created", and one without a container never got
# that far (the image build failed, or compose stopped early).
services=$("${compose[@]}" config --services) || exit 1
states=$("${compose[@]}" ps --all --format '{{.Service}} {{.State}} {{.ExitCode}}') || exit 1
failed=()
never=()
echo
echo "medcot chain:"
for service in $services; do
  read -r _ state code <<< "$(grep -E "^$service " <<< "$states" | head -n 1)"
  case "$state:${code:-}" in
    exited:0)  line="finished" ;;
    exited:130|exited:143)
               line="stopped by a signal (exit $code); its stage resumes from its last checkpoint"
               failed+=("$service") ;;
    exited:*)  line="FAILED (exit $code): ${compose[*]} logs $service"; failed+=("$service") ;;
    running:*) line="still running: ${compose[*]} logs --follow $service" ; never+=("$service") ;;
    created:*) line="never started: a job before it did not finish"; never+=("$service") ;;
    *)         line="no container: docker compose up did not get this far"; never+=("$service") ;;
  esac
  printf '  %-16s %s\n' "$service" "$line"
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "medcot chain: ${failed[*]} did not finish. Its log: ${compose[*]} logs ${failed[0]}" >&2
  echo "Fix the cause and run make up again: finished stages are skipped, the train job resumes." >&2
  exit 1
fi
if [ ${#never[@]} -gt 0 ] || [ "$up_status" -ne 0 ]; then
  echo "medcot chain: did not finish (docker compose up exited $up_status); make up again resumes it." >&2
  exit "$(( up_status ? up_status : 1 ))"
fi
echo "medcot chain: every job finished."
