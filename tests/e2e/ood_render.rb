# Renders an Open OnDemand batch-connect app the way OnDemand does, without OnDemand:
# stdlib ERB with OnDemand's bindings, and a job script with the same structure, order and
# helper names as ood_core's "basic" batch-connect template
# (ood_core lib/ood_core/batch_connect/template.rb and templates/basic.rb).
#
#   ruby ood_render.rb stage APP_DIR STAGED_ROOT FORM_JSON
#     submit.yml.erb -> STAGED_ROOT/submit.yml (checked), template/ -> STAGED_ROOT/ (every
#     *.erb rendered with `session` and `context`), STAGED_ROOT/job_script.sh (the wrapper)
#   ruby ood_render.rb view APP_DIR CONNECTION_YML
#     prints view.html.erb rendered against connection.yml's keys
require "erb"
require "fileutils"
require "json"
require "ostruct"
require "yaml"

def erb(path)
  ERB.new(File.read(path), trim_mode: "-")
end

# OnDemand's app.rb submit_opts: the form's values plus staged_root, as methods.
def render_submit(app, staged, form)
  ctx = OpenStruct.new(form.merge("staged_root" => staged))
  text = erb(File.join(app, "submit.yml.erb")).result(ctx.instance_eval { binding })
  YAML.safe_load(text)
end

# session.rb's TemplateBinding: `session` and `context` (the form's values).
def stage_templates(app, staged, form)
  binding_ = Struct.new(:session, :context).new(
    OpenStruct.new(staged_root: staged), OpenStruct.new(form)
  ).instance_eval { binding }
  FileUtils.cp_r(File.join(app, "template", "."), staged)
  Dir.glob(File.join(staged, "**", "*.erb")).each do |path|
    File.write(path.delete_suffix(".erb"), ERB.new(File.read(path), trim_mode: "-").result(binding_))
    File.delete(path)
  end
  File.chmod(0o755, File.join(staged, "script.sh"))
end

# ood_core's basic template: helpers, set_host, source before.sh, fork script.sh, source
# after.sh, create_yml (host, port, password + conn_params), wait, clean_up.
def job_script(staged, conn_params)
  params = (%w[host port password] + conn_params).uniq
  yml = params.map { |p| "#{p}: $#{p}" }.join('\n')
  <<~SH
    #!/bin/bash
    cd #{staged}
    export host
    export port

    create_yml () {
      echo "Generating connection YAML file..."
      (
        umask 077
        echo -e "#{yml}" > "#{File.join(staged, "connection.yml")}"
      )
    }

    clean_up () {
      echo "Cleaning up..."
      [[ ${SCRIPT_PID} ]] && pkill -P ${SCRIPT_PID} || :
      pkill -P $$
      exit ${1:-0}
    }

    source_helpers () {
      random_number () { shuf -i ${1}-${2} -n 1; }
      export -f random_number
      port_used () {
        local port="${1#*:}"
        local host=$((expr "${1}" : '\\(.*\\):' || echo "localhost") | awk 'END{print $NF}')
        (echo > "/dev/tcp/${host}/${port}") >/dev/null 2>&1
      }
      export -f port_used
      find_port () {
        local host="${1:-localhost}"
        local port=$(random_number "${2:-2000}" "${3:-65535}")
        while port_used "${host}:${port}"; do
          port=$(random_number "${2:-2000}" "${3:-65535}")
        done
        echo "${port}"
      }
      export -f find_port
      wait_until_port_used () {
        local port="${1}"
        local time="${2:-30}"
        for ((i=1; i<=time*2; i++)); do
          port_used "${port}"
          port_status=$?
          if [ "$port_status" == "0" ]; then
            return 0
          elif [ "$port_status" == "127" ]; then
            echo "commands to find port were either not found or inaccessible."
            return 127
          fi
          sleep 0.5
        done
        return 1
      }
      export -f wait_until_port_used
      create_passwd () {
        tr -cd 'a-zA-Z0-9' < /dev/urandom 2> /dev/null | head -c${1:-8}
      }
      export -f create_passwd
    }
    export -f source_helpers

    source_helpers

    host=$(hostname)

    [[ -e "#{staged}/before.sh" ]] && source "#{staged}/before.sh"

    echo "Script starting..."
    "#{staged}/script.sh" &
    SCRIPT_PID=$!

    [[ -e "#{staged}/after.sh" ]] && source "#{staged}/after.sh"

    create_yml

    wait ${SCRIPT_PID} || clean_up 1

    clean_up
  SH
end

def stage(app, staged, form)
  FileUtils.mkdir_p(staged)
  submit = render_submit(app, staged, form)
  File.write(File.join(staged, "submit.yml"), submit.to_yaml)
  bc = submit.fetch("batch_connect")
  raise "batch_connect.template is #{bc["template"].inspect}, want basic" unless bc["template"] == "basic"
  stage_templates(app, staged, form)
  File.write(File.join(staged, "job_script.sh"), job_script(staged, Array(bc["conn_params"])))
  File.chmod(0o755, File.join(staged, "job_script.sh"))
  # The scheduler arguments OnDemand would pass: script.native, one per line.
  File.write(File.join(staged, "native_args"), Array(submit.dig("script", "native")).join("\n") + "\n")
end

# sessions/connections/_custom.html.erb: connection.yml's keys as methods.
def view(app, connection)
  conn = OpenStruct.new(YAML.safe_load(File.read(connection)))
  print erb(File.join(app, "view.html.erb")).result(conn.instance_eval { binding })
end

case ARGV[0]
when "stage" then stage(ARGV[1], ARGV[2], JSON.parse(ARGV[3]))
when "view" then view(ARGV[1], ARGV[2])
else abort "usage: ood_render.rb stage APP STAGED FORM_JSON | view APP CONNECTION_YML"
end
