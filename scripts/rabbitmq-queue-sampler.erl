%% Samples the broker's side of a consumer, from inside RabbitMQ, while a
%% benchmark runs: for every queue whose name contains "switchyard-bench",
%% the queue process's state (running, runnable or waiting), mailbox and
%% reductions about every millisecond, the state of every channel process,
%% and every 20th sample the queue's own count of ready and unacknowledged
%% messages. One line per sample goes to /tmp/switchyard-queue-samples.txt
%% (the broker's user writes it); sampling stops after 100 s.
%%
%% Start it just before the benchmark:
%%   rabbitmqctl eval "$(cat scripts/rabbitmq-queue-sampler.erl)"
%%   AMQP_BENCH_ROUNDS=1 cargo bench -p switchyard --bench amqp_vs_native
%% then read it with scripts/rabbitmq-queue-phases.py.
%%
%% The sampler takes CPU from the broker: the rates of a sampled run are
%% lower than usual, for every consumer alike.
Sample = fun(File, Millis) ->
  spawn(fun() ->
    {ok, Fd} = file:open(File, [write, raw, delayed_write]),
    Deadline = erlang:monotonic_time(millisecond) + Millis,
    Bench = fun(Q) ->
      binary:match(element(4, amqqueue:get_name(Q)), <<"switchyard-bench">>) =/= nomatch
    end,
    Loop = fun Loop(N, Pids, Channels) ->
      Now = erlang:monotonic_time(microsecond),
      case Now div 1000 > Deadline of
        true ->
          file:close(Fd);
        false ->
          {Pids1, Channels1} =
            case N rem 200 of
              0 -> {[amqqueue:get_pid(Q) || Q <- rabbit_amqqueue:list(), Bench(Q)], rabbit_channel:list()};
              _ -> {Pids, Channels}
            end,
          Queue = [case erlang:process_info(P, [status, message_queue_len, reductions]) of
                     undefined -> "-";
                     [{status, S}, {message_queue_len, L}, {reductions, R}] -> io_lib:format("~s ~b ~b", [S, L, R])
                   end || P <- Pids1],
          Chans = [case erlang:process_info(P, [status, message_queue_len]) of
                     undefined -> "-";
                     [{status, S}, {message_queue_len, L}] -> io_lib:format("~s:~b", [S, L])
                   end || P <- Channels1],
          Counts = case N rem 20 of
                     0 -> [case catch rabbit_amqqueue:info(Q, [messages_ready, messages_unacknowledged]) of
                             [{_, Ready}, {_, Unacked}] -> io_lib:format(" m ~b ~b", [Ready, Unacked]);
                             _ -> ""
                           end || Q <- rabbit_amqqueue:list(), lists:member(amqqueue:get_pid(Q), Pids1)];
                     _ -> ""
                   end,
          file:write(Fd, [integer_to_list(Now), " | ", lists:join(",", Queue), " | ",
                          lists:join(" ", Chans), Counts, "\n"]),
          timer:sleep(1),
          Loop(N + 1, Pids1, Channels1)
      end
    end,
    Loop(0, [], [])
  end)
end,
Sample("/tmp/switchyard-queue-samples.txt", 100000).
